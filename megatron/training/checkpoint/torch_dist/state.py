"""The state of a training run as a sharded state dict, laid out as
Megatron-LM's checkpointing.py lays it out for torch_dist, so checkpoints
travel both ways:

    args                    argparse.Namespace of the flags (plain values), with consumed_train_samples
    checkpoint_version      3.0
    iteration
    model | model0, model1  each chunk's GPTModel.sharded_state_dict(): global names and shapes
    optimizer               the optimizer's sharded_state_dict(); the distributed optimizer's
                            state in the fully reshardable layout (per parameter, like Adam's own)
    opt_param_scheduler     the LR / weight-decay scheduler's state dict
    rng_state               ShardedObject over (PP, TP), written by the first data-parallel replica:
                            [{random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state,
                              rng_tracker_states}]
    content_metadata        (added by dist_checkpointing.save) how the optimizer state is laid out

Everything but ShardedTensors / ShardedObjects goes to common.pt.
"""

import argparse
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject

from megatron.training.checkpoint.settings import args_to_dict
from megatron.training.checkpoint.training_state import CHECKPOINT_VERSION, model_keys, unwrap

FULLY_RESHARDABLE = "fully_reshardable"
# The distributed optimizer's layouts whose state loads under another TP / PP layout.
LAYOUT_FREE_OPTIMIZER_SHARDING = ("fully_reshardable", "fully_sharded_model_space")


def content_metadata(args) -> dict:
    """How this run's state is sharded (saved in the checkpoint, read back at load)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = (
            FULLY_RESHARDABLE if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable")
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = bool(
            args.distrib_optim_fully_reshardable_mem_efficient)
    return metadata


def _with_groups(metadata: dict) -> dict:
    """The metadata megatron-core's sharded_state_dict() methods take: plus the DP group."""
    return dict(metadata, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))


def checkpoint_args(args, consumed_train_samples: int) -> argparse.Namespace:
    """The flags as Megatron-LM stores them: a Namespace of plain values."""
    return argparse.Namespace(**dict(args_to_dict(args), consumed_train_samples=consumed_train_samples))


def model_states(model: list, metadata: dict) -> Dict[str, dict]:
    """{"model" | "model<i>": the chunk's sharded state dict}."""
    return {key: unwrap(chunk).sharded_state_dict(metadata=metadata)
            for key, chunk in zip(model_keys(len(model)), model)}


def optimizer_has_state(optimizer) -> bool:
    """False before the first step: torch's Adam allocates its state lazily, and
    there is nothing to save yet (megatron-core's distributed optimizer cannot
    describe an empty state)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(o.optimizer.state) > 0 for o in inner)


def _allocate_adam_state(optimizer) -> None:
    """Give torch's Adam (used without Transformer Engine or apex) its state
    before the first step, as its first step would: zero moments, step 0.
    megatron-core's distributed optimizer describes its state for loading
    from the existing state, and fails on an empty one."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        distributed = hasattr(part, "gbuf_ranges")
        if not distributed or len(inner.state) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))


def rng_state() -> dict:
    """This process's random generators, under Megatron-LM's keys."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def rng_sharded_object() -> ShardedObject:
    """This rank's RNG state, one per (PP, TP) position; DP replicas share it."""
    ps = parallel_state
    return ShardedObject(
        "rng_state", [rng_state()],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _settable_here(generator_state: torch.Tensor) -> bool:
    """Without CUDA the CPU backend runs the "CUDA" generators on the CPU
    generator: a state saved that way fits, a GPU generator's does not."""
    return torch.cuda.is_available() or generator_state.numel() == torch.get_rng_state().numel()


def set_rng_state(states: List[dict]) -> List[str]:
    """Restore the generators from a loaded `rng_state` list; returns the
    names of those left as they are (a GPU run's CUDA generators, here without CUDA)."""
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    skipped = []
    cuda_state = state.get("cuda_rng_state")
    if cuda_state is not None:
        if _settable_here(cuda_state):
            torch.cuda.set_rng_state(cuda_state)
        else:
            skipped.append("cuda_rng_state")
    tracker = state["rng_tracker_states"]
    if all(_settable_here(t) for t in tracker.values()):
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    else:
        skipped.append("rng_tracker_states")
    return skipped


def state_for_save(args, model: list, optimizer, scheduler, iteration: int,
                   consumed_train_samples: int) -> dict:
    """The sharded state dict to save at `iteration` (collective: the
    distributed optimizer gathers its state over data parallelism)."""
    metadata = _with_groups(content_metadata(args))
    state = {"args": checkpoint_args(args, consumed_train_samples), "checkpoint_version": CHECKPOINT_VERSION,
             "iteration": iteration}
    state.update(model_states(model, metadata))
    if optimizer is not None and not args.no_save_optim:
        if optimizer_has_state(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if not args.no_save_rng:
        state["rng_state"] = rng_sharded_object()
    return state


def state_for_load(model: list, optimizer, saved_metadata: Optional[dict], with_optimizer: bool,
                   with_rng: bool) -> dict:
    """The sharded state dict naming what to read, laid out as the checkpoint's
    `content_metadata` says the optimizer state was saved."""
    metadata = _with_groups(saved_metadata or {})
    state = model_states(model, metadata)
    if with_optimizer:
        _allocate_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
    if with_rng:
        state["rng_state"] = rng_sharded_object()
    return state
