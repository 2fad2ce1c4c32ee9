"""Saving and loading a training run's checkpoint: the top of the package,
which chooses the format. `--ckpt-format` decides how a save is written
(torch_dist, megatron-core's distributed format, by default); a load reads
whatever the iteration directory holds.

    prepare_saves(args)                                    # before the loop: start torch_dist's writer queue
    load_checkpoint(args, model, optimizer, scheduler)     # -> (iteration, consumed_train_samples)
    save_checkpoint(args, iteration, model, optimizer, scheduler, consumed_train_samples)
    finalize_async_saves(args, blocking)                   # every iteration: publish finished async saves
    read_checkpoint_args(load_dir, step)                   # the flags a checkpoint recorded (iterations.py)
    first_rank_state(iter_dir)                             # its args and layout, either format

The package, bottom-up: files.py (one file: atomic writes, checksums,
weights-only reading) -> iterations.py (where checkpoints live, which are
complete) -> settings.py, load_checks.py, training_state.py (what a
checkpoint records and how it must fit) -> torch_dist/ (megatron-core's
format) -> reshard.py (weights into another layout) -> torch_format.py
(Megatron-LM's per-rank format) -> this module. Adapter checkpoints
(peft/checkpoint.py) are a client: with --lora-* flags the driver loads
through peft.checkpoint.load_adapter_checkpoint instead of load_checkpoint.
"""

from typing import Tuple

import torch

from megatron.training.checkpoint import torch_format
# read_checkpoint_args lives below (it reads one file, no megatron.core); the driver's callers find it here.
from megatron.training.checkpoint.iterations import (  # noqa: F401
    is_torch_dist, iteration_to_load, not_a_checkpoint, read_checkpoint_args,
)
from megatron.training.checkpoint.torch_dist import load as torch_dist_load
from megatron.training.checkpoint.torch_dist import save as torch_dist_save
from megatron.training.errors import CheckpointError


def prepare_saves(args) -> None:
    """Set-up for --save that would otherwise happen inside the first save."""
    if args.save and args.ckpt_format == "torch_dist":
        torch_dist_save.start_writer_queue()


def save_checkpoint(args, iteration: int, model: list, optimizer, scheduler, consumed_train_samples: int) -> str:
    """Save (or, with --async-save, start saving) the checkpoint of `iteration`
    under args.save in args.ckpt_format. Collective: every rank calls it.
    Returns the iteration directory."""
    save = torch_dist_save.save_checkpoint if args.ckpt_format == "torch_dist" else torch_format.save_checkpoint
    return save(args, iteration, model, optimizer, scheduler, consumed_train_samples)


def finalize_async_saves(args, blocking: bool = False) -> None:
    """With --async-save: publish the saves whose writers are done on every
    rank (with `blocking`, wait for all). Collective; every iteration calls it."""
    if args.async_save:
        torch_dist_save.finalize_async_saves(blocking)


def load_checkpoint(args, model: list, optimizer, scheduler) -> Tuple[int, int]:
    """Load args.load (its tracker's iteration, or --ckpt-step) into the model
    and, unless told otherwise, optimizer, scheduler and RNG. Collective.
    Returns (iteration, consumed_train_samples); (0, 0) when there is no
    checkpoint to load, for --finetune and for released checkpoints."""
    chosen = iteration_to_load(args.load, getattr(args, "ckpt_step", None))
    if chosen is None:
        if args.exit_on_missing_checkpoint or args.finetune:
            flag = "--finetune" if args.finetune else "--exit-on-missing-checkpoint"
            raise CheckpointError(f"{flag} --load {args.load}: nothing to load: {not_a_checkpoint(args.load)}")
        if torch.distributed.get_rank() == 0:
            print(f"no checkpoint found in {args.load}: starting from scratch", flush=True)
        return 0, 0
    iter_dir, iteration, release = chosen
    load = torch_dist_load.load_checkpoint if is_torch_dist(iter_dir) else torch_format.load_checkpoint
    return load(args, model, optimizer, scheduler, iter_dir, iteration, release)


def first_rank_state(iter_dir: str) -> dict:
    """The `args` and `layout` (and iteration, consumed samples) an iteration
    directory of either format records; tensors, if any, memory-mapped."""
    if is_torch_dist(iter_dir):
        return torch_dist_load.first_state(iter_dir)
    return torch_format.first_rank_state(iter_dir)
