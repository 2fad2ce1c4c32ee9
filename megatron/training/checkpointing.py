"""Checkpoints. `--ckpt-format torch_dist` (the default, megatron-core's
distributed format) lives in megatron/training/dist_ckpt/: save_checkpoint
dispatches on the flag, load_checkpoint on what the iteration directory holds
(`is_torch_dist`). This module is the rest: the tracker, staging and
publishing shared by both, and Megatron-LM's per-rank layout (`--ckpt-format torch`):

    SAVE/latest_checkpointed_iteration.txt        the last complete iteration
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt          (PP = 1)
    SAVE/iter_0000100/mp_rank_01_002/model_optim_rng.pt      (TP rank 1, PP rank 2)
    SAVE/iter_0000100/mp_rank_01_002/distrib_optim.pt        (--use-distributed-optimizer)

`model_optim_rng.pt` holds `model` (or `model0`, `model1`, ... per virtual
stage) under megatron-core's own state-dict names, `optimizer`,
`opt_param_scheduler`, `rng_state`, `iteration`, `consumed_train_samples`,
`checkpoint_version` and `args` (a plain dict, so the file loads with
`torch.load(weights_only=True)`). With adapters (--lora-rank) the `model`
entries hold the adapter tensors only and `adapter_base` names the frozen
base checkpoint; megatron/training/peft/checkpoint.py loads both. The distributed optimizer's shards are
gathered to data-parallel rank 0 (megatron-core's dp-zero format), so a run can
resume with a different data-parallel size.

Crash safety: every rank writes into `iter_XXXXXXX.partial/`, each file is
fsynced; after a barrier rank 0 renames the directory to `iter_XXXXXXX` and
only then replaces the tracker file (written aside, fsynced, renamed). A crash
at any moment leaves the tracker naming the previous complete checkpoint; a
failed write (a full disk) on any rank is agreed on by all ranks, the partial
directory removed and one error raised; what killed saves left is swept at the
next save (checkpoint_integrity.sweep_save_dir).

Loading: a file that is missing, truncated, corrupt or (with
--ckpt-checksum) changed on disk is a CheckpointError naming it, what is
wrong, and the newest complete iteration to resume from instead
(--ckpt-step N). All ranks raise the same error, whichever rank's file failed.
"""

import contextlib
import os
import random
import shutil
from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron.core import parallel_state, tensor_parallel

from megatron.training import checkpoint_reshard, sharding
from megatron.training.checkpoint_integrity import (
    OLD_SUFFIX, PARTIAL_SUFFIX, CheckpointFileWriter, checksum_problem, first_line, iteration_dirs,
    last_complete_iteration, sweep_save_dir, write_checksums,
)
from megatron.training.fileio import atomic_write_text, describe_os_error, fsync_dir, remove_quietly, temp_name
from megatron.training.arguments import args_to_dict
from megatron.training.errors import CheckpointError
from megatron.training.load_checks import check_state_fits, load_scheduler_state
from megatron.training.peft.arguments import adapters_enabled
from megatron.training.peft.targets import is_adapter_key

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(root: str) -> Tuple[Optional[int], bool]:
    """(iteration, is_release) from the tracker file; (None, False) if absent."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None, False
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text == "release":
        return 0, True
    if text is not None and text.isdigit():
        return int(text), False
    what = "binary data" if text is None else repr(text[:40])
    raise CheckpointError(with_fallback(root, None, f"{path} holds {what}, not an iteration number or 'release'"))


def with_fallback(root: str, iteration: Optional[int], problem: str) -> str:
    """`problem` followed by the newest complete iteration of `root` (below
    `iteration`) and how to resume from it, or the news that there is none."""
    found = last_complete_iteration(root, below=iteration)
    if found is None:
        return (f"{problem}. {root} holds no earlier complete checkpoint: restore the file from a copy, "
                "or start without --load")
    k, path = found
    return (f"{problem}. Iteration {k} ({path}) is complete: resume from it with --ckpt-step {k} "
            f"(or write {k} into {os.path.join(root, TRACKER_FILENAME)})")


def read_checkpoint_file(path: str, mmap: bool = True):
    """torch.load(weights_only=True) of a checkpoint file, checked against its
    recorded checksum when there is one; any failure is a CheckpointError
    naming the file and the iteration to use instead."""
    iter_dir = os.path.dirname(os.path.dirname(path))
    root, name = os.path.dirname(iter_dir), os.path.basename(iter_dir)
    iteration = int(name[5:12]) if name.startswith("iter_") and name[5:12].isdigit() else None
    if not os.path.isfile(path):
        raise CheckpointError(with_fallback(root, iteration, f"{path} is missing: the checkpoint is incomplete"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the file cannot be used
        why = ("it holds objects that torch.load(weights_only=True) refuses to unpickle" if "Weights only" in str(e)
               else "the file is truncated or corrupt")
        raise CheckpointError(with_fallback(root, iteration, f"{path} cannot be loaded ({first_line(e)}): {why}"))
    # A structurally sound file can still hold changed bytes (tensor data is read lazily).
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(with_fallback(root, iteration, f"{path}: {problem}"))
    return state


def atomic_torch_save(obj, path: str, checksum: bool = False) -> Optional[str]:
    """torch.save to a temporary name, fsync, then rename onto `path`; the
    temporary is removed on any failure. Returns the file's SHA-256 (hex)
    when `checksum`, computed while writing."""
    tmp = temp_name(path)
    out = None
    try:
        with open(tmp, "wb") as f:
            out = CheckpointFileWriter(f, checksum)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        # torch.save reports a failed write as a RuntimeError, and a failed flush
        # has no file name: raise the OSError, naming the file.
        cause = out.error if out is not None and out.error is not None else e
        if isinstance(cause, OSError) and (cause is not e or not e.filename):
            raise OSError(cause.errno, cause.strerror, tmp) from e
        raise
    return out.sha256.hexdigest() if checksum else None


def agreed_error(error: Optional[str]) -> Optional[str]:
    """The first error any rank met (collective: every rank calls it, with
    None when it met none), so that all ranks stop together instead of some
    waiting forever at the next collective."""
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


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


def _layout(args) -> dict:
    return {
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
    }


def _unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers (checkpoint keys are its names)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_state(args, chunk) -> dict:
    """A model chunk's entries for a checkpoint: all of them, or with adapters
    the adapter tensors only (the frozen base stays where `adapter_base` says)."""
    state = _unwrap(chunk).state_dict()
    if adapters_enabled(args):
        return {name: value for name, value in state.items() if is_adapter_key(name)}
    return state


def model_keys(n_chunks: int) -> List[str]:
    """The state keys of a model of `n_chunks` virtual-pipeline chunks."""
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _param_state_optimizers(optimizer):
    """The distributed optimizers inside a (possibly chained) megatron optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if hasattr(o, "get_parameter_state_dp_zero")]


def save_checkpoint(args, iteration: int, model: list, optimizer, scheduler, consumed_train_samples: int) -> str:
    """Save this rank's part of a checkpoint at `iteration` under args.save.
    Collective: every rank calls it. Returns the iteration directory."""
    if args.ckpt_format == "torch_dist":
        from megatron.training.dist_ckpt import save

        return save.save_checkpoint(args, iteration, model, optimizer, scheduler, consumed_train_samples)
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
        param_states = [o.get_parameter_state_dp_zero() for o in _param_state_optimizers(optimizer)]

    def write():
        os.makedirs(rank_dir, exist_ok=True)
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": consumed_train_samples,
            "args": args_to_dict(args),
            "layout": _layout(args),
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
        digests = {"model_optim_rng.pt": atomic_torch_save(state, os.path.join(rank_dir, "model_optim_rng.pt"),
                                                           checksum)}
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


def prepare_saves(args) -> None:
    """Set-up for --save that would otherwise happen inside the first save."""
    if args.save and args.ckpt_format == "torch_dist":
        from megatron.training.dist_ckpt import save

        save.start_writer_queue()


def finalize_async_saves(args, blocking: bool = False) -> None:
    """With --async-save: publish the saves whose writers are done on every
    rank (with `blocking`, wait for all). Collective; every iteration calls it."""
    if args.async_save:
        from megatron.training.dist_ckpt import save

        save.finalize_async_saves(blocking)


def publish_iteration(root: str, staging: str, final_dir: str, iteration: int) -> None:
    """Rename a complete staging directory to `final_dir`, then move the
    tracker to `iteration` (rank 0, after every rank's files are synced)."""
    fsync_dir(staging)
    if os.path.exists(final_dir):
        # Re-saving an iteration: keep the old copy until the new one is in place.
        old = final_dir + OLD_SUFFIX
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(staging, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, final_dir)
    fsync_dir(root)
    atomic_write_text(os.path.join(root, TRACKER_FILENAME), str(iteration))


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


def save_failed(root: str, iteration: int, error: str) -> CheckpointError:
    """The one-line error of a save that failed (its partial files removed)."""
    try:
        previous, _ = read_tracker(root)
    except CheckpointError:
        previous = None
    kept = f"iteration {previous} is still the latest checkpoint" if previous is not None else "nothing was saved"
    return CheckpointError(f"saving iteration {iteration} to {root} failed: {error}; the partial save was removed "
                           f"and {kept}")


def _iteration_to_load(load_dir: str, step: Optional[int] = None) -> Optional[Tuple[str, int, bool]]:
    """(iteration directory, iteration, is_release) to load from `load_dir`:
    iteration `step` (--ckpt-step) when given, else the tracker's; None when
    there is no tracker."""
    if step is not None:
        iter_dir = iteration_dir(load_dir, step)
        if not os.path.isdir(iter_dir):
            there = ", ".join(str(i) for i, _ in iteration_dirs(load_dir)[:8]) or "none"
            raise CheckpointError(f"--ckpt-step {step}: {iter_dir} does not exist (iterations in {load_dir}: {there})")
        return iter_dir, step, False
    iteration, release = read_tracker(load_dir)
    if iteration is None:
        return None
    iter_dir = iteration_dir(load_dir, iteration, release)
    if not os.path.isdir(iter_dir) and os.path.isdir(iter_dir + OLD_SUFFIX):
        return iter_dir + OLD_SUFFIX, iteration, release  # a re-save of it was killed between its two renames
    if not os.path.isdir(iter_dir):
        raise CheckpointError(with_fallback(load_dir, iteration, f"{os.path.join(load_dir, TRACKER_FILENAME)} names "
                                                                 f"iteration {iteration} but {iter_dir} is missing"))
    return iter_dir, iteration, release


def rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(iter_dir, rank_dir_name(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")


def first_rank_state(iter_dir: str) -> dict:
    """The state of the first rank file of an iteration directory, memory-mapped
    (tensors are read only when touched): its `args` and `layout` are the
    checkpoint's, whatever the layout it was saved under. For a torch_dist
    directory, those entries of its common state (no tensors)."""
    if is_torch_dist(iter_dir):
        from megatron.training.dist_ckpt import load

        return load.first_state(iter_dir)
    names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_")) if os.path.isdir(iter_dir) else []
    if not names:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_* directories: the checkpoint is incomplete, "
                              "or not one of this format")
    return read_checkpoint_file(os.path.join(iter_dir, names[0], "model_optim_rng.pt"))


def _saved_layout(state: dict) -> dict:
    """The parallel layout a rank file records, plus what resharding needs."""
    return dict(state["layout"], num_layers=state["args"]["num_layers"], swiglu=state["args"]["swiglu"])


def _check_layout(saved: dict, args, path: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)} vs this run {v}" for k, v in _layout(args).items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{path} was saved with another parallel layout ({'; '.join(diffs)}). Resume with the checkpoint's "
            "layout; or load the weights alone into this layout (resharded on load) with --finetune, or with "
            "--no-load-optim --no-load-rng; or reshard it with tools/checkpoint/util.py"
        )


def not_a_checkpoint(load_dir: str) -> str:
    """Why `load_dir` holds no checkpoint, and what to do instead (one line)."""
    if not os.path.isdir(load_dir):
        return f"{load_dir} does not exist"
    if os.path.isfile(os.path.join(load_dir, "config.json")):
        return (f"{load_dir} is a Hugging Face model directory, not a Megatron checkpoint: convert it first with "
                f"python tools/checkpoint/util.py --model-type GPT --loader llama2_hf --saver megatron "
                f"--load-dir {load_dir} --save-dir {os.path.normpath(load_dir)}-megatron")
    return (f"{load_dir} has no {TRACKER_FILENAME}: it holds no checkpoint of pretrain_gpt.py or "
            "tools/checkpoint/util.py")


def require_checkpoint(load_dir: Optional[str], needed_by: str) -> None:
    """Fail early, naming `needed_by` (a flag) and the fix, when `load_dir` is no checkpoint."""
    if load_dir is None:
        raise CheckpointError(f"{needed_by} needs --load DIR (the checkpoint to start from)")
    if read_tracker(load_dir)[0] is None:
        raise CheckpointError(f"{needed_by} --load {load_dir}: nothing to load: {not_a_checkpoint(load_dir)}")


def read_checkpoint_args(load_dir: str, step: Optional[int] = None) -> dict:
    """The flags a checkpoint was saved with (for --use-checkpoint-args); of
    iteration `step` when given (--ckpt-step)."""
    chosen = _iteration_to_load(load_dir, step)
    if chosen is None:
        raise CheckpointError(not_a_checkpoint(load_dir))
    if is_torch_dist(chosen[0]):
        from megatron.training.dist_ckpt import load

        return load.checkpoint_args(chosen[0])
    return first_rank_state(chosen[0])["args"]


def is_torch_dist(iter_dir: str) -> bool:
    """Whether an iteration directory holds a torch_dist checkpoint (megatron-core's
    metadata.json), rather than per-rank mp_rank_* directories."""
    return os.path.isfile(os.path.join(iter_dir, "metadata.json"))


def load_checkpoint(args, model: list, optimizer, scheduler) -> Tuple[int, int]:
    """Load args.load into the model (and, unless told otherwise, optimizer,
    scheduler and RNG). Returns (iteration, consumed_train_samples); (0, 0)
    when there is no checkpoint to load."""
    if adapters_enabled(args):  # the base and the adapter come from two checkpoints
        from megatron.training.peft.checkpoint import load_adapter_checkpoint

        return load_adapter_checkpoint(args, model, optimizer, scheduler)
    chosen = _iteration_to_load(args.load, getattr(args, "ckpt_step", None))
    if chosen is None:
        if args.exit_on_missing_checkpoint or args.finetune:
            flag = "--finetune" if args.finetune else "--exit-on-missing-checkpoint"
            raise CheckpointError(f"{flag} --load {args.load}: nothing to load: {not_a_checkpoint(args.load)}")
        if torch.distributed.get_rank() == 0:
            print(f"no checkpoint found in {args.load}: starting from scratch", flush=True)
        return 0, 0
    iter_dir, iteration, release = chosen
    if is_torch_dist(iter_dir):
        from megatron.training.dist_ckpt import load

        return load.load_checkpoint(args, model, optimizer, scheduler, iter_dir, iteration, release)
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
        from megatron.training.peft.arguments import adapter_flags

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
    if state is not None and all(state["layout"].get(k) == v for k, v in _layout(args).items()) and not (
            fresh_start and checkpoint_reshard.heads_differ(model, state)):
        _refuse_adapter_checkpoint(state, iter_dir)
        for key, chunk in zip(model_keys(len(model)), model):
            if key not in state:
                raise CheckpointError(f"{path} has no '{key}' entry")
            module = _unwrap(chunk)
            target = module.state_dict()
            matched = sharding.match_layer_spec(state[key], target)
            check_state_fits(matched, target, path)
            module.load_state_dict(matched, strict=True)
        return state, path
    saved = state if state is not None else first_rank_state(iter_dir)
    _refuse_adapter_checkpoint(saved, iter_dir)
    saved_layout = _saved_layout(saved)
    weights_only_load = fresh_start or (args.no_load_optim and args.no_load_rng)
    if not weights_only_load:
        _check_layout(saved_layout, args, iter_dir)
    checkpoint_reshard.load_model_resharded(args, model, iter_dir, saved_layout, fresh_heads=fresh_start)
    # Only the weights are taken; the data position is the checkpoint's.
    return {"iteration": iteration, "consumed_train_samples": saved.get("consumed_train_samples", 0)}, path


def _read_distributed_optimizer_state(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint was saved without --use-distributed-optimizer; "
                              "resume without it, or load with --no-load-optim")
    return read_checkpoint_file(path, mmap=False)


def _load_distributed_optimizer_state(optimizer, states) -> None:
    """The dp-zero parameter states (read on data-parallel rank 0, None
    elsewhere) scattered into the distributed optimizer. Collective."""
    with restoring_optimizer_state(optimizer):
        for i, opt in enumerate(_param_state_optimizers(optimizer)):
            opt.load_parameter_state_from_dp_zero(states[i] if states is not None else None)


@contextlib.contextmanager
def restoring_optimizer_state(optimizer):
    """Around loading a distributed optimizer's parameter state: outside
    autograd (the copies go into views of parameters: fp32 main params alias
    the model's), keeping torch Adam's `step` (below), and untying the step
    tensors afterwards: the optimizer's load_state_dict gives every parameter
    the *same* step tensor, which torch's Adam would then increment once per
    parameter per step."""
    parts = _param_state_optimizers(optimizer)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for opt in parts:
            stack.enter_context(_keeping_optimizer_step(opt))
        yield
    for opt in parts:
        for param_state in opt.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


@contextlib.contextmanager
def _keeping_optimizer_step(opt):
    """megatron-core 0.16.1 without Transformer Engine or apex uses torch's Adam,
    whose per-parameter state has a `step` tensor; the dp-zero and fully
    reshardable loaders only carry param / exp_avg / exp_avg_sq and fail on
    `step` (KeyError). The step is restored from the param groups, so keep it."""
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step)
        return original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del opt._set_main_param_and_optimizer_states
