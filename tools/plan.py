"""Plan a training run on a machine without GPUs, from pretrain_gpt.py's (or finetune_gpt.py's) flags.

    PLAN=1 bash scripts/llama_70B.sh                # a launch script runs it with its own flags
    PLAN=1 PLAN_ARGS="--gpu H100" bash scripts/qwen2.5_7B_sft.sh
    PLAN=1 NNODES=8 PLAN_ARGS="--gpu H100 --mfu 0.4" bash scripts/llama_70B.sh
    python tools/plan.py --num-layers 80 ... --world-size 64 --tflops-per-gpu 161 [--vocab-size 32000]

Validates the layout with the training driver's own checks (an invalid layout
exits with status 2 and a message naming the fix), prints memory per GPU per
pipeline stage, FLOPs per iteration, iteration time and tokens/day; exits
with status 1 when the plan does not fit the GPU's memory.
"""

import os
import sys

# The repo root first: `megatron.training` is this repo's driver.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.data.sft_dataset import add_sft_args  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.planner.plan import build_planner_parser, format_plan, plan_from_argv  # noqa: E402


def build_parser():
    return build_planner_parser(add_sft_args)


def run(argv=None) -> int:
    # finetune_gpt.py's SFT flags are accepted so that its launch scripts plan as they run
    plan = plan_from_argv(sys.argv[1:] if argv is None else argv, add_sft_args)
    print(format_plan(plan))
    return 0 if plan.fits else 1


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
