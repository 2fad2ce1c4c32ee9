"""How every benchmark hands over its markdown: printed, and with --out
written aside and renamed into place, so an interrupted run never leaves a
half-written results file (the scripts in this folder import it as a sibling)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.fileio import atomic_write_text  # noqa: E402


def emit(text: str, path=None) -> None:
    print(text, flush=True)
    if path:
        atomic_write_text(path, text)
