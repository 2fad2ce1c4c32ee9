import os
import sys

# The repo root goes first so `megatron.training` is this repo's driver while
# `megatron.core` still resolves to the pinned pip package (namespace package).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
