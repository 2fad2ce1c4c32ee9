import os
import sys

# The repo root goes first so `megatron.training` is this repo's driver while
# `megatron.core` still resolves to the pinned pip package (namespace package).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ask NVML, not the CUDA driver, whether there is a GPU: a driver initialised in
# this process would make the forked test processes (tests/distributed) fail.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch sizes its thread pool on import)

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels' tests run them on CPU tensors under
    # Triton's interpreter. Triton reads this when it is first imported (and
    # megatron.core imports it), so it is set before any test module loads.
    # It changes nothing else: the driver runs Triton kernels on a CPU only
    # with FINLLAMA_CPU_KERNELS=1 (megatron/training/kernels/capabilities.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")
