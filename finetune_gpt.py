"""Supervised fine-tuning of a Llama-family GPT model with megatron-core, on
the same driver, flags, layouts and checkpoints as pretraining.

    python tools/preprocess_sft_data.py --input train.jsonl --output-prefix sft/train ...
    python tools/preprocess_sft_data.py --input valid.jsonl --output-prefix sft/valid ...
    torchrun --nproc_per_node 8 finetune_gpt.py --tensor-model-parallel-size 2 ... \\
        --load llama-megatron --finetune --use-checkpoint-args --save sft-ckpt \\
        --data-path sft/train --valid-data-path sft/valid [--sft-packing] [--sft-truncation drop]

Everything but the dataset is pretrain_gpt.py's: model provider, forward
step and loss (mean cross-entropy over the tokens the loss mask keeps, here
the response tokens). The SFT dataset and its flags: megatron/training/data/sft_dataset.py.
"""

import os
import sys

# The repo root first: `megatron.training` is this repo's driver, while
# `megatron.core` resolves to the pinned pip package (a namespace package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.training.arguments import build_parser as build_driver_parser  # noqa: E402
from megatron.training.data.sft_dataset import add_sft_args, build_sft_datasets  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402
from pretrain_gpt import forward_step, model_provider  # noqa: E402


def train_valid_test_datasets_provider(args, tokenizer):
    return build_sft_datasets(args, tokenizer)


def build_parser():
    return build_driver_parser(add_sft_args)


def main(argv=None):
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=argv,
                    extra_args_provider=add_sft_args)


if __name__ == "__main__":
    sys.exit(run_main(main))
