"""Run Megatron-LM's own pretrain_gpt.py on the pip megatron-core (gpu_throughput.py --compare-megatron-lm).

    torchrun --standalone --nproc_per_node 1 benchmarks/megatron_lm_launch.py MEGATRON_LM_TREE <its flags>

MEGATRON_LM_TREE holds Megatron-LM core_v0.16.1's pretrain_gpt.py and
megatron/training; without megatron/core there, the pip package of the same
release is used. Megatron-LM's start-up runs `make` to compile its dataset
helpers from source; the pip wheel ships them compiled (and no Makefile), so
with the pip package that one step is skipped. Everything else is
Megatron-LM's code, unchanged.
"""

import os
import runpy
import sys


def main() -> None:
    tree = os.path.abspath(sys.argv[1])
    script = os.path.join(tree, "pretrain_gpt.py")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [tree] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.argv = [script] + sys.argv[2:]

    import megatron.core.datasets.utils as dataset_utils

    if not os.path.abspath(dataset_utils.__file__).startswith(tree + os.sep):
        dataset_utils.compile_helpers = lambda: None  # the wheel's helpers_cpp is already built
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
