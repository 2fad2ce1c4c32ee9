"""Pretrain a Llama-family GPT model with megatron-core.

    torchrun --nproc_per_node 8 pretrain_gpt.py --tensor-model-parallel-size 2 ... (Megatron-LM flags)

The four callables handed to `pretrain` are Megatron-LM's contract: model
provider, dataset provider, forward step (returning the output and a loss
function that the pipeline schedule applies on the last stage), loss.
"""

import os
import sys
from functools import partial

# The repo root first: `megatron.training` is this repo's driver, while
# `megatron.core` resolves to the pinned pip package (a namespace package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.training.arguments import build_parser as build_driver_parser  # noqa: E402
from megatron.training.data.pretrain import build_pretraining_datasets, split_batch  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.initialize import device  # noqa: E402
from megatron.training.models.llama import build_gpt_model  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402


def model_provider(args, config, pre_process=None, post_process=None, vp_stage=None):
    return build_gpt_model(args, config, pre_process, post_process, vp_stage)


def train_valid_test_datasets_provider(args, tokenizer):
    return build_pretraining_datasets(args, tokenizer)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean cross-entropy over the tokens the mask keeps."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    # The schedule scales the returned loss in place (1 / micro-batches), so
    # the reported value must be a copy, not a view.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(args, data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = split_batch(next(data_iterator), device())
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def build_parser():
    return build_driver_parser()


def main(argv=None):
    return pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
