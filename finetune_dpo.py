"""Preference tuning (DPO, IPO, hinge, SimPO) of a Llama-family GPT model with
megatron-core, on the same driver, flags, layouts and checkpoints as
pretraining and SFT, full or with adapters.

    python tools/preprocess_preference_data.py --input prefs.jsonl --output-prefix dpo/train --seq-length 2048 ...
    torchrun --nproc_per_node 8 finetune_dpo.py --tensor-model-parallel-size 2 ... \\
        --load sft-ckpt --finetune --use-checkpoint-args --save dpo-ckpt --data-path dpo/train \\
        --pref-loss sigmoid --pref-beta 0.1 [--lora-rank 8 ...] [--pref-reference copy|precomputed]

The providers handed to `pretrain`: the GPT model (and, for
--pref-reference copy, a frozen copy of it), the pair dataset
(megatron/training/data/preference_dataset.py), and a forward step that runs
the policy and the reference in one pipeline pass (preference/reference.py)
and returns the loss function the schedule applies on the last stage: the
preference loss from per-sequence summed response log-probs, with TRL's
metrics (preference/loss.py). Logged: loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""

import os
import sys
from functools import partial

# The repo root first: `megatron.training` is this repo's driver, while
# `megatron.core` resolves to the pinned pip package (a namespace package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.training.arguments import build_parser as build_driver_parser  # noqa: E402
from megatron.training.data.preference_dataset import build_preference_datasets, split_pair_batch  # noqa: E402
from megatron.training.errors import run_main  # noqa: E402
from megatron.training.initialize import device  # noqa: E402
from megatron.training.models.llama import build_gpt_model  # noqa: E402
from megatron.training.preference.arguments import add_preference_args, validate_preference_args  # noqa: E402
from megatron.training.preference.loss import PairLogps, preference_loss, sequence_logps  # noqa: E402
from megatron.training.preference.precompute import precompute_missing  # noqa: E402
from megatron.training.preference.reference import Reference, policy_and_reference  # noqa: E402
from megatron.training.training import pretrain  # noqa: E402
from megatron.training.training_log import print_rank_0  # noqa: E402

REFERENCE_DESCRIPTIONS = {
    "adapters": "the base with the adapters switched off, in the same forward pass",
    "copy": "a frozen copy of {ref_load}, in the same forward pass",
    "precomputed": "log-probs of {ref_load} stored beside the data",
    None: "none (reference-free loss)",
}


def loss_func(settings, loss_mask: torch.Tensor, ref_logps, output_tensor: torch.Tensor):
    """The preference loss of a micro-batch of m pairs: mean over its pairs.
    `output_tensor`: per-token NLL of the rows [chosen x m; rejected x m], then,
    with a live reference, the reference's rows in the same order;
    `ref_logps` [m, 2]: precomputed reference log-probs (or None)."""
    rows = loss_mask.shape[0]
    m = rows // 2
    tokens = loss_mask.sum(dim=-1)
    logps = sequence_logps(output_tensor[:rows], loss_mask)
    policy = PairLogps(logps[:m], logps[m:], tokens[:m], tokens[m:])
    reference = None
    if output_tensor.shape[0] > rows:
        ref = sequence_logps(output_tensor[rows:].detach(), loss_mask)
        reference = PairLogps(ref[:m], ref[m:], tokens[:m], tokens[m:])
    elif ref_logps is not None:
        ref = ref_logps.float()
        reference = PairLogps(ref[:, 0], ref[:, 1], tokens[:m], tokens[m:])
    losses, metrics = preference_loss(settings, policy, reference)
    loss = losses.mean()
    # The schedule scales the returned loss in place: the reported value is a copy.
    return loss, {"loss": loss.detach().clone(), **metrics}


class PreferenceRun:
    """The providers and forward step of one run; they share its reference model."""

    def __init__(self):
        self.settings = None
        self.reference = None

    def configure(self, args):
        self.settings = validate_preference_args(args)
        if self.reference is None:
            self.reference = Reference(args.pref_reference)
            print_rank_0(f"> preference tuning: --pref-loss {args.pref_loss}, beta {args.pref_beta:g}; reference: "
                         + REFERENCE_DESCRIPTIONS[args.pref_reference].format(ref_load=args.ref_load))
        return self.settings

    def model_provider(self, args, config, pre_process=None, post_process=None, vp_stage=None):
        self.configure(args)
        model = build_gpt_model(args, config, pre_process, post_process, vp_stage)
        if self.reference.mode == "copy":
            self.reference.add_copy(args, config, build_gpt_model, pre_process, post_process, vp_stage)
        return model

    def train_valid_test_datasets_provider(self, args, tokenizer):
        self.configure(args)
        return build_preference_datasets(args, tokenizer)

    def forward_step(self, args, data_iterator, model):
        tokens, labels, loss_mask, position_ids, ref_logps = split_pair_batch(next(data_iterator), device())
        output = policy_and_reference(model, self.reference, tokens, position_ids, labels)
        return output, partial(loss_func, self.settings, loss_mask, ref_logps)


def build_parser():
    return build_driver_parser(add_preference_args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run = PreferenceRun()
    precompute_missing(argv, run, add_preference_args)
    return pretrain(run.train_valid_test_datasets_provider, run.model_provider, run.forward_step, argv=argv,
                    extra_args_provider=add_preference_args)


if __name__ == "__main__":
    sys.exit(run_main(main))
