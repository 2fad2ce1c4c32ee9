"""What finetune.py checks before any work: the configuration's driver
command against the base model, by the driver's own checks, in a few
seconds and without writing anything.

    check_before_work(plan, repo, name)      # ConfigError (one line) or None

The base model's settings come from what its checkpoint records (a Megatron
base, or {save_dir}/checkpoints when the run resumes) or, for a Hugging Face
base not yet converted, from its config.json as the converter reads it
(decoder_configs.megatron_args_from_hf: refused families, rope types and
sliding windows fail here too). The training command finetune.py would run
is parsed by its entry point's parser (finetune_gpt.py's SFT flags or
finetune_dpo.py's preference flags), takes the base's settings as
--use-checkpoint-args does (checkpoint/settings.py), and goes through
arguments.validate_args with the layout's world size (and, for stage dpo,
validate_preference_args): the TP size against the heads, query groups and
FFN size, the PP size against the layers, the batch against the data-parallel
size, the adapter and preference flags, extra_args. On a machine with CUDA
the layout's processes must also find a GPU each (finetune.py launches one
node). Reads config.json or one checkpoint file; imports torch and the flag
modules, not megatron.core.
"""

import os
import re

from megatron.training.errors import UserError
from megatron.training.finetune_config import (
    PREFERENCE_FLAGS, STAGE_SCRIPT, TRACKER, ConfigError, Plan, train_command,
)

# The entry point's own flags by stage: (add them to the parser, check them after validate_args or None).
STAGE_FLAGS = {
    "sft": ("megatron.training.data.sft_dataset", "add_sft_args", None),
    "dpo": ("megatron.training.preference.arguments", "add_preference_args", "validate_preference_args"),
}
# Driver flags -> the configuration key that sets them, named in error messages beside the flag.
CONFIG_KEYS = {
    "--tensor-model-parallel-size": "layout tensor_parallel",
    "--pipeline-model-parallel-size": "layout pipeline_parallel",
    "--micro-batch-size": "batch_size", "--seq-length": "seq_length", "--lr": "learning_rate", "--min-lr": "min_lr",
    "--lr-warmup-fraction": "warmup_ratio", "--lr-decay-style": "lr_decay_style", "--weight-decay": "weight_decay",
    "--optimizer": "optimizer", "--sgd-momentum": "sgd_momentum", "--attention-dropout": "dropout",
    "--hidden-dropout": "dropout", "--bf16": "bf16", "--seed": "seed", "--save-interval": "save_interval",
    "--sft-packing": "packing", "--sft-truncation": "truncation", "--lora-rank": "lora_r",
    "--lora-alpha": "lora_alpha", "--lora-dropout": "lora_dropout", "--lora-target-modules": "lora_target_modules",
    "--lora-quant-bits": "quant_bits", "--lora-use-dora": "peft_use_dora", "--lora-use-rslora": "peft_use_rslora",
    "--global-batch-size": "batch_size x gradient_accumulation_steps x layout data_parallel",
    **{flag: key for key, flag in PREFERENCE_FLAGS.items()},
}
_FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def base_settings(plan: Plan, load_dir: str) -> dict:
    """The settings of the model the training command loads from `load_dir`:
    what that checkpoint records, or (an HF base still to convert) what its
    conversion will record."""
    if os.path.exists(os.path.join(load_dir, TRACKER)):
        from megatron.training.checkpoint.iterations import read_checkpoint_args

        return read_checkpoint_args(load_dir)
    import json

    from megatron.training.checkpoint_convert.decoder_configs import megatron_args_from_hf

    with open(os.path.join(plan.cfg["base_model"], "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return megatron_args_from_hf(config)


def parsed_train_args(plan: Plan, repo: str):
    """The training command's flags parsed and checked as its entry point
    will: the base's settings taken, validate_args at the layout's world size."""
    import importlib

    from megatron.training import arguments
    from megatron.training.checkpoint.settings import take_checkpoint_settings

    # The sample counts only set --train-iters and --eval-iters, which nothing here depends on.
    command = train_command(plan, repo, train_samples=plan.global_batch_size, valid_samples=None)
    argv = command[command.index(os.path.join(repo, STAGE_SCRIPT[plan.cfg["stage"]])) + 1:]
    module, add, validate = STAGE_FLAGS[plan.cfg["stage"]]
    module = importlib.import_module(module)
    add = getattr(module, add)
    args = arguments.parse_args(argv, add)
    load = args.load
    take_checkpoint_settings(args, base_settings(plan, load), arguments.flags_given(argv, add), load)
    arguments.validate_args(args, plan.world_size)
    if validate is not None:
        getattr(module, validate)(args)
    return args


def check_devices(plan: Plan) -> None:
    """One process per GPU of this machine: finetune.py launches a single node."""
    import torch

    if torch.cuda.is_available() and plan.world_size > torch.cuda.device_count():
        layout = {k: plan.cfg["layout"].get(k, 1) for k in ("tensor_parallel", "pipeline_parallel", "data_parallel")}
        raise ConfigError(
            f"the layout {layout} needs {plan.world_size} processes, one per GPU, and this machine has "
            f"{torch.cuda.device_count()}: choose a layout whose product is at most {torch.cuda.device_count()} "
            "(finetune.py runs on one node; launch finetune_gpt.py with torchrun across nodes for more)")


def in_config_terms(message: str) -> str:
    """A driver message with each flag the configuration sets followed by its key."""
    return _FLAG.sub(lambda m: f"{CONFIG_KEYS[m.group(1)]} ({m.group(1)})" if m.group(1) in CONFIG_KEYS
                     else m.group(1), message)


def check_before_work(plan: Plan, repo: str, name: str) -> None:
    """Raise ConfigError (one line naming the configuration and the fix) when
    the training command would fail its own checks on this base model."""
    try:
        check_devices(plan)
        parsed_train_args(plan, repo)
    except UserError as e:
        raise ConfigError(f"{name}: base_model {plan.cfg['base_model']}: {in_config_terms(str(e))}") from None
