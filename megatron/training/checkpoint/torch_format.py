"""Megatron-LM's per-rank checkpoint format (`--ckpt-format torch`):

    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt          (PP = 1)
    SAVE/iter_0000100/mp_rank_01_002/model_optim_rng.pt      (TP rank 1, PP rank 2)
    SAVE/iter_0000100/mp_rank_01_002/distrib_optim.pt        (--use-distributed-optimizer)
    SAVE/iter_0000100/mp_rank_01_002/checksums.sha256        (--ckpt-checksum)

`model_optim_rng.pt` holds `model` (or `model0`, `model1`, ... per virtual
stage) under megatron-core's own state-dict names, `optimizer`,
`opt_param_scheduler`, `rng_state`, `iteration`, `consumed_train_samples`,
`checkpoint_version` and `args` (a plain dict, so the file loads with
`torch.load(weights_only=True)`). With adapters (--lora-rank) the `model`
entries hold the adapter tensors only and `adapter_base` names the frozen
base checkpoint; peft/checkpoint.py loads both. The distributed optimizer's
shards are gathered to data-parallel rank 0 (megatron-core's dp-zero format),
so a run can resume with a different data-parallel size.

Crash safety: every rank writes into `iter_XXXXXXX.partial/`, each file is
fsynced; after a barrier rank 0 publishes the directory (iterations.py). A
failed write (a full disk) on any rank is agreed on by all ranks, the partial
directory removed and one error raised.

Loading: under the saved layout each rank reads its own file; under another
one the weights are resharded (reshard.py). A file that is missing,
truncated, corrupt or (with --ckpt-checksum) changed on disk is a
CheckpointError naming it and the newest complete iteration to resume from
instead (--ckpt-step N); all ranks raise the same error, whichever rank's
file failed.
"""

import os
import random
import shutil
from typing import Tuple

import numpy as np
import torch

from megatron.core import parallel_state, tensor_parallel

from megatron.training import sharding
from megatron.training.checkpoint import reshard
from megatron.training.checkpoint.files import atomic_torch_save, write_checksums
from megatron.training.checkpoint.iterations import (
    PARTIAL_SUFFIX, RANK_FILE, agreed_error, first_rank_file, iteration_dir, publish_iteration, rank_dir_name,
    rank_file, read_checkpoint_file, save_failed, sweep_save_dir,
)
from megatron.training.checkpoint.load_checks import check_state_fits, load_scheduler_state
from megatron.training.checkpoint.settings import args_to_dict
from megatron.training.checkpoint.training_state import (
    CHECKPOINT_VERSION, check_layout, heads_differ, layout, model_keys, param_state_optimizers,
    restoring_optimizer_state, saved_layout, unwrap,
)
from megatron.training.errors import CheckpointError, first_line
from megatron.training.fileio import describe_os_error, remove_quietly
from megatron.training.peft.arguments import adapter_flags, adapters_enabled
from megatron.training.peft.targets import is_adapter_key


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "random_rng_state": list(random.getstate()[1]),
        "random_rng_pos": random.getstate()[2],
        "np_rng_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "np_rng_pos": int(np_state[2]),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["random_rng_state"]), state["random_rng_pos"]))
    np.random.set_state(("MT19937", state["np_rng_keys"].numpy().astype(np.uint32), state["np_rng_pos"], 0, 0.0))
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _model_state(args, chunk) -> dict:
    """A model chunk's entries for a checkpoint: all of them, or with adapters
    the adapter tensors only (the frozen base stays where `adapter_base` says)."""
    state = unwrap(chunk).state_dict()
    if adapters_enabled(args):
        return {name: value for name, value in state.items() if is_adapter_key(name)}
    return state


def save_checkpoint(args, iteration: int, model: list, optimizer, scheduler, consumed_train_samples: int) -> str:
    """Save this rank's part of a checkpoint at `iteration` under args.save.
    Collective: every rank calls it. Returns the iteration directory."""
    root = args.save
    final_dir = iteration_dir(root, iteration)
    staging = final_dir + PARTIAL_SUFFIX
    rank = torch.distributed.get_rank()

    def prepare():
        os.makedirs(root, exist_ok=True)
        sweep_save_dir(root, lambda msg: print(msg, flush=True))
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)

    _collectively(prepare if rank == 0 else None, root, iteration, staging)

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rank_dir = os.path.join(staging, rank_dir_name(tp_rank, pp_rank, args.pipeline_model_parallel_size))
    dp_rank = parallel_state.get_data_parallel_rank()

    # Collective over the data-parallel group: every DP rank takes part.
    param_states = None
    if optimizer is not None and not args.no_save_optim and args.use_distributed_optimizer:
        param_states = [o.get_parameter_state_dp_zero() for o in param_state_optimizers(optimizer)]

    def write():
        os.makedirs(rank_dir, exist_ok=True)
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": consumed_train_samples,
            "args": args_to_dict(args),
            "layout": layout(args),
        }
        for key, chunk in zip(model_keys(len(model)), model):
            state[key] = _model_state(args, chunk)
        if adapters_enabled(args):
            state["adapter_base"] = dict(args.adapter_base)
        if optimizer is not None and not args.no_save_optim:
            state["optimizer"] = optimizer.state_dict()
            state["opt_param_scheduler"] = scheduler.state_dict()
        if not args.no_save_rng:
            state["rng_state"] = _rng_state()
        checksum = getattr(args, "ckpt_checksum", False)
        digests = {RANK_FILE: atomic_torch_save(state, os.path.join(rank_dir, RANK_FILE), checksum)}
        if param_states is not None:
            digests["distrib_optim.pt"] = atomic_torch_save(param_states, os.path.join(rank_dir, "distrib_optim.pt"),
                                                            checksum)
        if checksum:
            write_checksums(rank_dir, digests)

    _collectively(write if dp_rank == 0 else None, root, iteration, staging)

    def publish():
        publish_iteration(root, staging, final_dir, iteration)

    _collectively(publish if rank == 0 else None, root, iteration, staging)
    return final_dir


def _collectively(step, root: str, iteration: int, staging: str) -> None:
    """Run this rank's part of a save step (None: nothing to do here), then
    agree with every rank: if a write failed anywhere (a full disk, a
    read-only folder), rank 0 removes the partial iteration and every rank
    raises the same CheckpointError. Also the step's barrier."""
    rank = torch.distributed.get_rank()
    failure = error = None
    if step is not None:
        try:
            step()
        except OSError as e:
            failure, error = e, describe_os_error(e, "--save")
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks were told
            failure, error = e, f"rank {rank}: {type(e).__name__}: {first_line(e)}"
    error = agreed_error(error)
    if error is None:
        return
    if rank == 0:
        remove_quietly(staging)
    if failure is not None and not isinstance(failure, OSError):
        raise failure  # a bug, not the disk: its own traceback on the rank it happened on
    raise save_failed(root, iteration, error)


def first_rank_state(iter_dir: str) -> dict:
    """The state of the first rank file of an iteration directory, memory-mapped
    (tensors are read only when touched): its `args` and `layout` are the
    checkpoint's, whatever the layout it was saved under."""
    return read_checkpoint_file(first_rank_file(iter_dir))


def load_checkpoint(args, model: list, optimizer, scheduler, iter_dir: str, iteration: int,
                    release: bool) -> Tuple[int, int]:
    """Load the per-rank checkpoint in `iter_dir` into the model (and, unless
    told otherwise, optimizer, scheduler and RNG). Collective. Returns
    (iteration, consumed_train_samples); (0, 0) for --finetune and released
    checkpoints."""
    fresh_start = args.finetune or release
    load_optim = optimizer is not None and not fresh_start and not args.no_load_optim

    # Every file this rank needs is read (and the weights loaded) before any
    # collective, so that a bad file on one rank stops all ranks with its message.
    failure = error = param_states = None
    try:
        state, path = _load_model(args, model, iter_dir, iteration, release)
        if load_optim and args.use_distributed_optimizer and parallel_state.get_data_parallel_rank() == 0:
            param_states = _read_distributed_optimizer_state(os.path.join(os.path.dirname(path), "distrib_optim.pt"))
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks were told
        failure = e
        error = str(e) if isinstance(e, CheckpointError) else (
            f"loading {iter_dir} failed on rank {torch.distributed.get_rank()}: {type(e).__name__}: {first_line(e)}")
    error = agreed_error(error)
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(error)

    restore_training_state(args, optimizer, scheduler, state, path, fresh_start, param_states)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        print(f"loaded checkpoint {iter_dir} (iteration {iteration})", flush=True)
    if fresh_start:
        return 0, 0
    return iteration, state.get("consumed_train_samples", 0)


def _refuse_adapter_checkpoint(state: dict, iter_dir: str) -> None:
    if "adapter_base" in state:
        raise CheckpointError(f"{iter_dir} is an adapter checkpoint (on the base {state['adapter_base']['load']}): "
                              f"load it with its adapter flags ({' '.join(adapter_flags(state['args']))})")


_READ_HERE = object()


def restore_training_state(args, optimizer, scheduler, state: dict, path: str, fresh_start: bool,
                           param_states=_READ_HERE) -> None:
    """Optimizer, LR scheduler and RNG from a rank file's `state` (unless
    starting afresh or told not to); without optimizer state, the optimizer
    takes its main parameters from the loaded weights. `param_states`: the
    distributed optimizer's dp-zero states when already read (else read here,
    beside `path`, on data-parallel rank 0)."""
    if optimizer is not None and not fresh_start and not args.no_load_optim:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} was saved without optimizer state (--no-save-optim): "
                                  "load it with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if args.use_distributed_optimizer:
            if param_states is _READ_HERE:
                param_states = None
                if parallel_state.get_data_parallel_rank() == 0:
                    param_states = _read_distributed_optimizer_state(
                        os.path.join(os.path.dirname(path), "distrib_optim.pt"))
            _load_distributed_optimizer_state(optimizer, param_states)
        if scheduler is not None:
            load_scheduler_state(scheduler, state["opt_param_scheduler"], path, args)
    elif optimizer is not None:
        # Weights loaded without optimizer state: a mixed-precision optimizer's fp32 main
        # parameters are copies taken when it was built (the random initialisation), and its
        # first step would write them back over the loaded weights. Take them again.
        optimizer.reload_model_params()
    if not fresh_start and not args.no_load_rng:
        if "rng_state" not in state:
            raise CheckpointError(f"{path} was saved without RNG state (--no-save-rng): load it with --no-load-rng")
        _set_rng_state(state["rng_state"])


def _load_model(args, model: list, iter_dir: str, iteration: int, release: bool) -> Tuple[dict, str]:
    """Load the model weights of `iter_dir` into this rank's chunks (resharded
    when the layout differs); returns (this rank's state, its file)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    path = rank_file(iter_dir, tp_rank, pp_rank, args.pipeline_model_parallel_size)
    # This rank's own file, memory-mapped, when the checkpoint has one: under an
    # unchanged layout it is all this rank needs. Otherwise any rank file says
    # which layout the checkpoint was saved under.
    state = read_checkpoint_file(path) if os.path.isfile(path) else None
    fresh_start = args.finetune or release
    # A fresh start may change a model's heads (a classifier from a pretrained
    # encoder): the resharding path fills in what another rank's file holds (a
    # tied output layer from the embedding) and starts the rest afresh.
    if state is not None and all(state["layout"].get(k) == v for k, v in layout(args).items()) and not (
            fresh_start and heads_differ(model, state)) and not _vocab_padding_differs(model, state):
        _refuse_adapter_checkpoint(state, iter_dir)
        for key, chunk in zip(model_keys(len(model)), model):
            if key not in state:
                raise CheckpointError(f"{path} has no '{key}' entry")
            module = unwrap(chunk)
            target = module.state_dict()
            matched = sharding.match_layer_spec(state[key], target)
            check_state_fits(matched, target, path)
            module.load_state_dict(matched, strict=True)
        return state, path
    saved = state if state is not None else first_rank_state(iter_dir)
    _refuse_adapter_checkpoint(saved, iter_dir)
    layout_saved = saved_layout(saved)
    weights_only_load = fresh_start or (args.no_load_optim and args.no_load_rng)
    if not weights_only_load:
        check_layout(layout_saved, args, iter_dir)
        if state is not None and _vocab_padding_differs(model, state):
            raise CheckpointError(
                f"{iter_dir} pads the vocabulary to other rows than this run (--make-vocab-size-divisible-by x TP): "
                "its weights are refitted on load, but this format's optimizer state is not; load with --finetune "
                "or --no-load-optim --no-load-rng, or resume with the checkpoint's --make-vocab-size-divisible-by")
    reshard.load_model_resharded(args, model, iter_dir, layout_saved, fresh_heads=fresh_start)
    # Only the weights are taken; the data position is the checkpoint's.
    return {"iteration": iteration, "consumed_train_samples": saved.get("consumed_train_samples", 0)}, path


def _vocab_padding_differs(model: list, state: dict) -> bool:
    """Whether this rank's file holds vocabulary rows (sharding.VOCAB_ROWS) of
    another count than the model: the same vocabulary padded for another
    --make-vocab-size-divisible-by, to be refitted by the resharding path."""
    for key, chunk in zip(model_keys(len(model)), model):
        target, saved = unwrap(chunk).state_dict(), state.get(key, {})
        if any(name in saved and name in target and saved[name].shape[0] != target[name].shape[0]
               for name in sharding.VOCAB_ROWS):
            return True
    return False


def _read_distributed_optimizer_state(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint was saved without --use-distributed-optimizer; "
                              "resume without it, or load with --no-load-optim")
    return read_checkpoint_file(path, mmap=False)


def _load_distributed_optimizer_state(optimizer, states) -> None:
    """The dp-zero parameter states (read on data-parallel rank 0, None
    elsewhere) scattered into the distributed optimizer. Collective."""
    with restoring_optimizer_state(optimizer):
        for i, opt in enumerate(param_state_optimizers(optimizer)):
            opt.load_parameter_state_from_dp_zero(states[i] if states is not None else None)


