"""Checkpoints in Megatron-LM's per-rank layout (`--ckpt-format torch`):

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
at any moment leaves the tracker naming the previous complete checkpoint.
"""

import contextlib
import os
import random
import shutil
from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron.core import parallel_state, tensor_parallel

from megatron.training import sharding
from megatron.training.fileio import atomic_write_text, fsync_dir, temp_name
from megatron.training.arguments import args_to_dict
from megatron.training.peft.arguments import adapters_enabled
from megatron.training.peft.targets import is_adapter_key

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
PARTIAL_SUFFIX = ".partial"
_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT_LAYER = "output_layer.weight"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


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
    text = open(path).read().strip()
    if text == "release":
        return 0, True
    try:
        return int(text), False
    except ValueError:
        raise CheckpointError(f"{path} should hold an iteration number or 'release', not {text!r}")


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary name, fsync, then rename onto `path`."""
    tmp = temp_name(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    root = args.save
    final_dir = iteration_dir(root, iteration)
    staging = final_dir + PARTIAL_SUFFIX
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
    torch.distributed.barrier()

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rank_dir = os.path.join(staging, rank_dir_name(tp_rank, pp_rank, args.pipeline_model_parallel_size))
    dp_rank = parallel_state.get_data_parallel_rank()

    # Collective over the data-parallel group: every DP rank takes part.
    param_states = None
    if optimizer is not None and not args.no_save_optim and args.use_distributed_optimizer:
        param_states = [o.get_parameter_state_dp_zero() for o in _param_state_optimizers(optimizer)]

    if dp_rank == 0:
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
        atomic_torch_save(state, os.path.join(rank_dir, "model_optim_rng.pt"))
        if param_states is not None:
            atomic_torch_save(param_states, os.path.join(rank_dir, "distrib_optim.pt"))
    torch.distributed.barrier()

    if rank == 0:
        fsync_dir(staging)
        if os.path.exists(final_dir):
            # Re-saving an iteration: keep the old copy until the new one is in place.
            old = final_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
            os.replace(staging, final_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, final_dir)
        fsync_dir(root)
        atomic_write_text(os.path.join(root, TRACKER_FILENAME), str(iteration))
    torch.distributed.barrier()
    return final_dir


def _iteration_dir_from_tracker(load_dir: str) -> Tuple[str, int, bool]:
    iteration, release = read_tracker(load_dir)
    if iteration is None:
        raise FileNotFoundError(load_dir)
    iter_dir = iteration_dir(load_dir, iteration, release)
    if not os.path.isdir(iter_dir):
        raise CheckpointError(f"{load_dir}/{TRACKER_FILENAME} names iteration {iteration} but {iter_dir} is missing")
    return iter_dir, iteration, release


def rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(iter_dir, rank_dir_name(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")


def first_rank_state(iter_dir: str) -> dict:
    """The state of the first rank file of an iteration directory, memory-mapped
    (tensors are read only when touched): its `args` and `layout` are the
    checkpoint's, whatever the layout it was saved under."""
    names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_")) if os.path.isdir(iter_dir) else []
    if not names:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_* directories: the checkpoint is incomplete, "
                              "or not one of this format")
    return torch.load(os.path.join(iter_dir, names[0], "model_optim_rng.pt"), map_location="cpu",
                      weights_only=True, mmap=True)


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


def read_checkpoint_args(load_dir: str) -> dict:
    """The flags a checkpoint was saved with (for --use-checkpoint-args)."""
    iteration, release = read_tracker(load_dir)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no {TRACKER_FILENAME} in {load_dir}")
    return first_rank_state(iteration_dir(load_dir, iteration, release))["args"]


def load_checkpoint(args, model: list, optimizer, scheduler) -> Tuple[int, int]:
    """Load args.load into the model (and, unless told otherwise, optimizer,
    scheduler and RNG). Returns (iteration, consumed_train_samples); (0, 0)
    when there is no checkpoint to load."""
    if adapters_enabled(args):  # the base and the adapter come from two checkpoints
        from megatron.training.peft.checkpoint import load_adapter_checkpoint

        return load_adapter_checkpoint(args, model, optimizer, scheduler)
    try:
        iter_dir, iteration, release = _iteration_dir_from_tracker(args.load)
    except FileNotFoundError:
        if args.exit_on_missing_checkpoint:
            raise CheckpointError(f"--load {args.load} has no {TRACKER_FILENAME} and --exit-on-missing-checkpoint is set")
        if torch.distributed.get_rank() == 0:
            print(f"no checkpoint found in {args.load}: starting from scratch", flush=True)
        return 0, 0

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    path = rank_file(iter_dir, tp_rank, pp_rank, args.pipeline_model_parallel_size)
    # This rank's own file, memory-mapped, when the checkpoint has one: under an
    # unchanged layout it is all this rank needs. Otherwise any rank file says
    # which layout the checkpoint was saved under.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if os.path.isfile(path) else None
    if state is None or any(state["layout"].get(k) != v for k, v in _layout(args).items()):
        saved = state if state is not None else first_rank_state(iter_dir)
        _refuse_adapter_checkpoint(saved, iter_dir)
        saved_layout = _saved_layout(saved)
        weights_only_load = args.finetune or release or (args.no_load_optim and args.no_load_rng)
        if not weights_only_load:
            _check_layout(saved_layout, args, iter_dir)
        _load_model_resharded(args, model, iter_dir, saved_layout)
        # Only the weights are taken; the data position is the checkpoint's.
        state = {"iteration": iteration, "consumed_train_samples": saved.get("consumed_train_samples", 0)}
        del saved
    else:
        _refuse_adapter_checkpoint(state, iter_dir)
        for key, chunk in zip(model_keys(len(model)), model):
            if key not in state:
                raise CheckpointError(f"{path} has no '{key}' entry")
            module = _unwrap(chunk)
            module.load_state_dict(sharding.match_layer_spec(state[key], module.state_dict()), strict=True)

    fresh_start = args.finetune or release
    restore_training_state(args, optimizer, scheduler, state, path, fresh_start)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        print(f"loaded checkpoint {os.path.dirname(os.path.dirname(path))} (iteration {iteration})", flush=True)
    if fresh_start:
        return 0, 0
    return iteration, state.get("consumed_train_samples", 0)


def _refuse_adapter_checkpoint(state: dict, iter_dir: str) -> None:
    if "adapter_base" in state:
        from megatron.training.peft.arguments import adapter_flags

        raise CheckpointError(f"{iter_dir} is an adapter checkpoint (on the base {state['adapter_base']['load']}): "
                              f"load it with its adapter flags ({' '.join(adapter_flags(state['args']))})")


def restore_training_state(args, optimizer, scheduler, state: dict, path: str, fresh_start: bool) -> None:
    """Optimizer, LR scheduler and RNG from a rank file's `state` (unless
    starting afresh or told not to); without optimizer state, the optimizer
    takes its main parameters from the loaded weights."""
    if optimizer is not None and not fresh_start and not args.no_load_optim:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} was saved without optimizer state (--no-save-optim): "
                                  "load it with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if args.use_distributed_optimizer:
            _load_distributed_optimizer_state(optimizer, os.path.join(os.path.dirname(path), "distrib_optim.pt"))
        if scheduler is not None:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None:
        # Weights loaded without optimizer state: a mixed-precision optimizer's fp32 main
        # parameters are copies taken when it was built (the random initialisation), and its
        # first step would write them back over the loaded weights. Take them again.
        optimizer.reload_model_params()
    if not fresh_start and not args.no_load_rng:
        if "rng_state" not in state:
            raise CheckpointError(f"{path} was saved without RNG state (--no-save-rng): load it with --no-load-rng")
        _set_rng_state(state["rng_state"])


def _load_distributed_optimizer_state(optimizer, path: str) -> None:
    states = None
    if parallel_state.get_data_parallel_rank() == 0:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint was saved without --use-distributed-optimizer; "
                                  "resume without it, or load with --no-load-optim")
        states = torch.load(path, map_location="cpu", weights_only=True)
    # The copies go into views of parameters (fp32 main params alias the model's):
    # outside autograd, as megatron-core's other loaders are.
    with torch.no_grad():
        for i, opt in enumerate(_param_state_optimizers(optimizer)):
            with _keeping_optimizer_step(opt):
                opt.load_parameter_state_from_dp_zero(states[i] if states is not None else None)
            # Its load_state_dict gives every parameter the *same* step tensor, which
            # torch's Adam then increments once per parameter per step: untie them.
            for param_state in opt.optimizer.state.values():
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = param_state["step"].clone()


@contextlib.contextmanager
def _keeping_optimizer_step(opt):
    """megatron-core 0.16.1 without Transformer Engine or apex uses torch's Adam,
    whose per-parameter state has a `step` tensor; the dp-zero loader only
    carries param / exp_avg / exp_avg_sq and fails on `step` (KeyError). The
    step was already restored by `optimizer.load_state_dict`, so keep it."""
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


def _load_model_resharded(args, model: list, iter_dir: str, saved: dict, select=None, on_full=None) -> None:
    """Load model weights saved under another TP/PP/VP layout: merge the
    source shards into full tensors, then cut this rank's part. Every rank
    maps the source files of all source ranks (memory-mapped) and merges only
    the entries it needs, one layer at a time (each is cut and loaded before
    the next is merged): its own layers, then the embedding, output layer and
    final norm where its model chunks have them.

    select(name): which of the model's state-dict entries this checkpoint
    provides (default: all). on_full(chunk, full): called with the full
    (unsharded, chunk-local names) tensors of each layer (and of the other
    entries) before they are cut, for layers that keep a transformed copy of
    them (QLoRA's quantised base)."""
    src_tp, src_pp = saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"]
    src_vp = saved["virtual_pipeline_model_parallel_size"]
    if saved["num_layers"] != args.num_layers:
        raise CheckpointError(f"{iter_dir} has {saved['num_layers']} layers, this run --num-layers {args.num_layers}")
    gated = bool(saved["swiglu"])
    tied = not args.untie_embeddings_and_output_weights
    offsets = sharding.layer_offsets(args.num_layers, args.pipeline_model_parallel_size,
                                     args.virtual_pipeline_model_parallel_size)
    per_chunk = args.num_layers // (args.pipeline_model_parallel_size * len(model))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    targets = [{n: v for n, v in _unwrap(chunk).state_dict().items() if select is None or select(n)}
               for chunk in model]

    # What this rank needs, in global names: its layers, and the other entries its chunks hold.
    layer_ranges = [(offsets[(pp_rank, v)], offsets[(pp_rank, v)] + per_chunk) for v in range(len(model))]
    other_names = {n for target in targets for n in target if not n.startswith("decoder.layers.")}
    if tied and _OUTPUT_LAYER in other_names:
        other_names.add(_EMBEDDING)  # the output layer may have to be copied from the embedding (below)

    def needed(name: str) -> bool:
        index = sharding.layer_index(name)
        if index is None:
            return name in other_names
        return any(first <= index < end for first, end in layer_ranges)

    loaded = [set() for _ in model]

    def load(full: dict) -> None:
        """Cut full tensors (global names) for every chunk holding some of them, and load them."""
        for v, chunk in enumerate(model):
            module, target = _unwrap(chunk), targets[v]
            local = sharding.match_layer_spec(sharding.to_local_names(full, offsets[(pp_rank, v)], per_chunk), target)
            if on_full is not None:
                on_full(module, local)
            names = [n for n in target if n in local]
            shard = sharding.shard_for_rank(_fit_vocab(local, target, args.tensor_model_parallel_size), tp_rank,
                                            args.tensor_model_parallel_size, gated, names)
            module.load_state_dict(shard, strict=False)
            loaded[v].update(names)

    others: dict = {}
    src_offsets = sharding.layer_offsets(saved["num_layers"], src_pp, src_vp)
    for p in range(src_pp):
        states = [torch.load(rank_file(iter_dir, t, p, src_pp), map_location="cpu", weights_only=True, mmap=True)
                  for t in range(src_tp)]
        for v, key in enumerate(model_keys(src_vp or 1)):
            chunks = [sharding.to_global_names(s[key], src_offsets[(p, v)]) for s in states]
            by_layer: dict = {}
            for name in chunks[0]:
                if needed(name):
                    by_layer.setdefault(sharding.layer_index(name), []).append(name)
            for index, names in by_layer.items():
                merged = sharding.merge_tp_states([{n: c[n] for n in names} for c in chunks], gated)
                if index is None:
                    others.update(merged)
                else:
                    load(merged)
        del states, chunks
    if _OUTPUT_LAYER not in others and tied and _EMBEDDING in others:
        # Tied embeddings saved without pipelining: the last stage's output layer is
        # megatron-core's copy of the word embeddings.
        others[_OUTPUT_LAYER] = others[_EMBEDDING]
    load(others)
    for v, target in enumerate(targets):
        missing = [n for n in target if n not in loaded[v] and not n.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{iter_dir} lacks {missing[:3]}: it is not a checkpoint of this model")


def _fit_vocab(local: dict, target: dict, tp: int) -> dict:
    """The full embedding/output matrices in `local` padded (zeros) or trimmed
    to this run's padded vocabulary size (the target's rows x TP)."""
    out = dict(local)
    for name in (_EMBEDDING, _OUTPUT_LAYER):
        if name in local and name in target:
            out[name] = sharding.fit_vocab_rows(local[name], target[name].shape[0] * tp)
    return out
