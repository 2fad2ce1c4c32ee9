"""Loading torch_dist checkpoints under any TP / PP / VP / DP layout.

Every rank asks megatron-core's `dist_checkpointing.load` for exactly its own
shards, described by its model's (and optimizer's) sharded state dict, and
reads them from the global tensors: a checkpoint written at TP=2 resumes at
TP=1 x DP=2 or at PP=2 with virtual stages, optimizer state included. What
cannot carry over is said: RNG states belong to one (TP, PP) position, so
they are restored only under the same TP and PP (as in Megatron-LM). Works
for checkpoints written by this driver and by Megatron-LM (the local and the
Transformer Engine layer specs store the same names).
"""

import contextlib
import os
from typing import Dict, List, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from megatron.training import sharding
from megatron.training.checkpoint.files import common_args, load_common
from megatron.training.checkpoint.iterations import with_fallback
from megatron.training.checkpoint.load_checks import load_scheduler_state
from megatron.training.checkpoint.torch_dist import checksums, safe_load
from megatron.training.checkpoint.torch_dist import state as state_module
from megatron.training.checkpoint.training_state import (
    head_names, model_keys, report_heads, restoring_optimizer_state, unwrap,
)
from megatron.training.errors import CheckpointError

# Flags whose values fix the shapes of the tensors in a checkpoint.
_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "swiglu",
                "untie_embeddings_and_output_weights", "add_bias_linear")


def checkpoint_args(iter_dir: str) -> dict:
    """The flags a torch_dist checkpoint was saved with (for --use-checkpoint-args)."""
    return common_args(load_common(iter_dir), iter_dir)


def first_state(iter_dir: str) -> dict:
    """What torch_format.first_rank_state gives for the per-rank format, from
    a torch_dist directory's common state: `args`, `layout`, `iteration`,
    `consumed_train_samples` (no tensors)."""
    common = load_common(iter_dir)
    saved = common_args(common, iter_dir)
    layout = layout_of(saved)
    return {"args": saved, "iteration": common.get("iteration"),
            "consumed_train_samples": saved.get("consumed_train_samples", 0),
            "layout": {"tensor_model_parallel_size": layout["TP"], "pipeline_model_parallel_size": layout["PP"],
                       "virtual_pipeline_model_parallel_size": saved.get("virtual_pipeline_model_parallel_size")}}


def _groups(flags: dict) -> int:
    return flags["num_query_groups"] if flags.get("group_query_attention") else flags["num_attention_heads"]


def _check_model_shape(saved: dict, args, iter_dir: str) -> None:
    ours = vars(args)
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (this run: {ours[k]})"
             for k in _SHAPE_FLAGS if k in saved and saved[k] is not None and saved[k] != ours.get(k)]
    if "num_attention_heads" in saved and _groups(saved) != _groups(ours):
        diffs.append(f"{_groups(saved)} query groups (this run: {_groups(ours)})")
    if diffs:
        raise CheckpointError(f"{iter_dir} holds another model: {'; '.join(diffs)}. Pass the checkpoint's model "
                              "flags, or --use-checkpoint-args")


def layout_of(flags: dict) -> Dict[str, object]:
    return {"TP": flags.get("tensor_model_parallel_size", 1), "PP": flags.get("pipeline_model_parallel_size", 1),
            "VP": flags.get("virtual_pipeline_model_parallel_size") or 1, "DP": flags.get("data_parallel_size")}


def _describe(layout: dict, distributed_optimizer: bool) -> str:
    text = " ".join(f"{k}={v}" for k, v in layout.items() if v is not None)
    return text + (" with the distributed optimizer" if distributed_optimizer else "")


def _wants_optimizer(common: dict, saved: dict, args, iter_dir: str, same_tp_pp: bool) -> bool:
    """Whether to read the optimizer state; raises when the checkpoint cannot give it."""
    if "optimizer" not in common:
        if common.get("iteration", 0) == 0:
            return False  # an initial checkpoint: no step taken, a fresh optimizer is its state
        raise CheckpointError(f"{iter_dir} was saved without optimizer state (--no-save-optim): load it with "
                              "--no-load-optim or --finetune")
    saved_distributed = bool(saved.get("use_distributed_optimizer"))
    if saved_distributed != bool(args.use_distributed_optimizer):
        said = "with" if saved_distributed else "without"
        raise CheckpointError(f"{iter_dir} was saved {said} --use-distributed-optimizer, and this run is "
                              f"{'without' if saved_distributed else 'with'} it: resume {said} it, or start the "
                              "optimizer afresh with --no-load-optim")
    sharding_type = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if saved_distributed and not same_tp_pp and sharding_type not in state_module.LAYOUT_FREE_OPTIMIZER_SHARDING:
        raise CheckpointError(
            f"{iter_dir} holds the distributed optimizer's state as '{sharding_type}', which loads only under the "
            f"TP and PP it was saved with ({_describe(layout_of(saved), False)}): resume with that TP/PP, or load "
            "with --no-load-optim (save with the default --dist-ckpt-optim-fully-reshardable to change layouts)")
    return True


def _allow_vocab_padding_change(sharded: dict, ckpt_tensors: dict) -> bool:
    """Let the entries whose rows are the padded vocabulary (sharding.VOCAB_ROWS:
    the embedding, the output layer and BERT's LM output bias), and their
    optimizer state, load when this layout pads the vocabulary to another size
    (--make-vocab-size-divisible-by x TP): missing rows are zeros,
    surplus rows are dropped (the padding ids never occur). Returns whether any did."""
    changed = False
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.key.endswith(sharding.VOCAB_ROWS) and sh.key in ckpt_tensors:
            saved_shape = tuple(ckpt_tensors[sh.key].global_shape)
            if saved_shape != tuple(sh.global_shape) and saved_shape[1:] == tuple(sh.global_shape)[1:]:
                sh.allow_shape_mismatch = True
                changed = True
    return changed


def _read(args, sharded: dict, iter_dir: str) -> dict:
    strategy = safe_load.SafeShardedLoadStrategy()
    if args.ckpt_fully_parallel_load:
        strategy = FullyParallelLoadStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
    try:
        # megatron-core calls "unexpected" what this run asks for and the checkpoint lacks.
        loaded, _, not_in_checkpoint = dist_checkpointing.load(
            sharded, iter_dir, strategy, safe_load.SafeCommonLoadStrategy(), strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointingException as e:
        raise CheckpointError(f"{iter_dir}: {str(e).strip().splitlines()[0]}") from None
    except DcpCheckpointException as e:
        raise safe_load.reading_error(e, iter_dir) from None
    # Extra states are None outside FP8; a checkpoint written without them is complete.
    missing = sorted(k for k in not_in_checkpoint if "_extra_state" not in k)
    if missing:
        raise CheckpointError(f"{iter_dir} lacks {len(missing)} of the tensors this run needs ({', '.join(missing[:3])}"
                              f"{', ...' if len(missing) > 3 else ''}): it is not a checkpoint of this model")
    return loaded


@contextlib.contextmanager
def _naming_a_loadable_iteration(iter_dir: str, iteration: int, release: bool):
    """A CheckpointError raised while reading `iter_dir`'s files goes on with
    the newest complete iteration to resume from instead (--ckpt-step)."""
    try:
        yield
    except CheckpointError as e:
        root = os.path.dirname(os.path.abspath(iter_dir))
        raise CheckpointError(with_fallback(root, None if release else iteration, str(e))) from None


def _leave_out_fresh_heads(model: list, sharded: dict, ckpt_tensors: dict, iter_dir: str) -> Dict[str, set]:
    """A fresh start may change a model's heads (a classifier from a pretrained
    encoder): the head entries (the modules' `fresh_head_prefixes`) the
    checkpoint lacks are not asked for and keep their initialisation; heads
    only the checkpoint has are not read. Both are reported, as for the
    torch format. Returns {model key: the names left out}."""
    fresh, asked = {}, set()
    for key, chunk in zip(model_keys(len(model)), model):
        module = unwrap(chunk)
        tensors = {n: sh for n, sh in sharded[key].items() if isinstance(sh, ShardedTensor)}
        asked |= {sh.key for sh in tensors.values()}
        lacking = {n for n in head_names(module, tensors) if tensors[n].key not in ckpt_tensors}
        extra = {m.rsplit(".", 1)[0] + "._extra_state" for m in lacking}
        fresh[key] = lacking | (extra & set(sharded[key]))
        for name in fresh[key]:
            del sharded[key][name]
    last = unwrap(model[-1])
    dropped = head_names(last, set(ckpt_tensors) - asked) if getattr(last, "post_process", False) \
        else set()
    report_heads(iter_dir, set().union(*fresh.values()), dropped)
    return fresh


def _load_model(model: list, loaded: dict, fresh: Dict[str, set]) -> None:
    for key, chunk in zip(model_keys(len(model)), model):
        module = unwrap(chunk)
        own = module.state_dict()
        state = sharding.match_layer_spec(loaded[key], own)
        state.update((n, own[n]) for n in fresh.get(key, ()) if n in own)  # started afresh: its initialisation
        module.load_state_dict(state, strict=True)


def load_checkpoint(args, model: list, optimizer, scheduler, iter_dir: str, iteration: int,
                    release: bool) -> Tuple[int, int]:
    """Load the torch_dist checkpoint in `iter_dir` into this run's layout.
    Collective. Returns (iteration, consumed_train_samples); (0, 0) for
    --finetune and released checkpoints."""
    with _naming_a_loadable_iteration(iter_dir, iteration, release):
        if getattr(args, "ckpt_checksum", False):
            checksums.verify(iter_dir, log=lambda line: print(line, flush=True))
        common = load_common(iter_dir)
    saved = common_args(common, iter_dir)
    _check_model_shape(saved, args, iter_dir)
    saved_layout, this_layout = layout_of(saved), layout_of(vars(args))
    same_tp_pp = (saved_layout["TP"], saved_layout["PP"]) == (this_layout["TP"], this_layout["PP"])
    fresh_start = args.finetune or release
    notes: List[str] = []

    with_optimizer = (optimizer is not None and not fresh_start and not args.no_load_optim
                      and _wants_optimizer(common, saved, args, iter_dir, same_tp_pp))
    with_rng = not fresh_start and not args.no_load_rng
    if with_rng and saved.get("no_save_rng"):
        raise CheckpointError(f"{iter_dir} was saved without RNG state (--no-save-rng): load it with --no-load-rng")
    if with_rng and not same_tp_pp:
        with_rng = False
        notes.append("RNG state not restored (it belongs to one TP/PP position)")

    sharded = state_module.state_for_load(model, optimizer, common.get("content_metadata"), with_optimizer, with_rng)
    with _naming_a_loadable_iteration(iter_dir, iteration, release):
        ckpt_tensors = safe_load.SafeShardedLoadStrategy().load_tensors_metadata(iter_dir)
        if _allow_vocab_padding_change(sharded, ckpt_tensors):
            notes.append("vocabulary padding rows refitted to this TP")
        fresh = _leave_out_fresh_heads(model, sharded, ckpt_tensors, iter_dir) if fresh_start else {}
        loaded = _read(args, sharded, iter_dir)

    _load_model(model, loaded, fresh)
    if with_optimizer:
        with restoring_optimizer_state(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None:
            load_scheduler_state(scheduler, loaded["opt_param_scheduler"], iter_dir, args)
    elif optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()  # the fp32 main weights start from the loaded ones
    if with_rng:
        skipped = state_module.set_rng_state(loaded["rng_state"])
        notes += [f"{name} not restored (GPU generators, and no CUDA here)" for name in skipped]

    torch.distributed.barrier()
    ckpt_iteration = int(common.get("iteration", iteration))
    if torch.distributed.get_rank() == 0:
        parts = "model" + (" and optimizer state" if with_optimizer else "")
        moved = any(v is not None and v != this_layout[k] for k, v in saved_layout.items())
        print(f"loaded checkpoint {iter_dir} (torch_dist, iteration {ckpt_iteration}) saved under "
              f"{_describe(saved_layout, bool(saved.get('use_distributed_optimizer')))} into "
              f"{_describe(this_layout, bool(args.use_distributed_optimizer))}: {parts}"
              f"{' resharded' if moved else ''}{'; ' if notes else ''}{'; '.join(notes)}",
              flush=True)
    if fresh_start:
        return 0, 0
    return ckpt_iteration, int(saved.get("consumed_train_samples", 0))
