"""Adapter checkpoints, and loading a model whose frozen base and adapters
come from two checkpoints.

An adapter checkpoint is the driver's usual per-rank layout
(SAVE/iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt, written by
checkpoint/torch_format.py with the same crash safety) whose `model`
entries hold only the adapter tensors, under megatron-core names
(`decoder.layers.<i>.self_attention.linear_qkv.adapter.q_proj.lora_A.weight`,
chunk-local i), plus `adapter_base` = {"load": absolute path of the base
checkpoint, "iteration": its iteration}. `args` records the adapter settings
(lora_rank, lora_alpha, ...); optimizer, scheduler, RNG and data position are
kept as in any checkpoint.

With --lora-* flags, --load DIR is either
- a full-model checkpoint, with --finetune: DIR becomes the frozen base and
  new adapters start (DoRA's magnitudes from the loaded base); or
- an adapter checkpoint: its base is loaded from `adapter_base`, then its
  adapters (resharded to this run's TP/PP layout), then, unless --finetune,
  optimizer, scheduler, RNG and data position (these need the checkpoint's
  layout, as for any checkpoint).
The base loads under any layout; with QLoRA always through full tensors,
which are quantised whole (peft/quantized.py); a torch_dist base (the
driver's default format) always through full tensors too.
"""

import os
import time
from typing import Dict, Tuple

import torch

from megatron.training import sharding
from megatron.training.checkpoint import reshard
from megatron.training.checkpoint.iterations import (
    TRACKER_FILENAME, is_torch_dist, iteration_dir, iteration_to_load, rank_file, read_checkpoint_file, read_tracker,
)
from megatron.training.checkpoint.save_load import first_rank_state
from megatron.training.checkpoint.torch_format import restore_training_state
from megatron.training.checkpoint.training_state import layout, model_keys, saved_layout, unwrap
from megatron.training.errors import CheckpointError
from megatron.training.peft.arguments import ADAPTER_KEYS, adapter_flags
from megatron.training.peft.model import init_magnitudes
from megatron.training.peft.quantized import QuantizedLinear
from megatron.training.peft.targets import LayerDims, is_adapter_key

# Settings that must match to load adapters (the dropout may change; a QLoRA-trained adapter may be loaded over
# a full-precision base and the other way round).
_MATCHING = tuple(k for k in ADAPTER_KEYS if k not in ("lora_dropout", "lora_quant_bits"))


def _print(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def load_adapter_checkpoint(args, model: list, optimizer, scheduler) -> Tuple[int, int]:
    """save_load.load_checkpoint for a run with adapters. Returns
    (iteration, consumed_train_samples); (0, 0) for new adapters or --finetune."""
    chosen = iteration_to_load(args.load, getattr(args, "ckpt_step", None))
    if chosen is None:
        raise CheckpointError(f"--load {args.load} holds no checkpoint ({TRACKER_FILENAME} is missing): "
                              "adapters train on a frozen base, give its checkpoint directory")
    iter_dir, iteration, release = chosen
    first = first_rank_state(iter_dir)
    if "adapter_base" not in first:
        if not (args.finetune or release):
            raise CheckpointError(
                f"--load {args.load} is a full-model checkpoint: add --finetune to train new adapters on it as the "
                "frozen base (to resume adapters, --load the directory they were saved to)")
        args.adapter_base = {"load": os.path.abspath(args.load), "iteration": iteration}
        load_base(args, model, iter_dir, first)
        del first
        init_magnitudes([unwrap(chunk) for chunk in model])
        restore_training_state(args, optimizer, scheduler, {}, iter_dir, fresh_start=True)
        _print(f"> new adapters on the base {args.adapter_base['load']} (iteration {iteration})")
        return 0, 0

    _check_same_adapter(args, first["args"], iter_dir)
    layout_diffs = [f"{k}: checkpoint {first['layout'].get(k)} vs this run {v}"
                    for k, v in layout(args).items() if first["layout"].get(k) != v]
    if layout_diffs and not (args.finetune or (args.no_load_optim and args.no_load_rng)):
        raise CheckpointError(
            f"{iter_dir} was saved with another parallel layout ({'; '.join(layout_diffs)}): resume with the "
            "checkpoint's layout, or load the adapters alone into this layout (resharded on load) with --finetune, "
            "or with --no-load-optim --no-load-rng to keep the data position")
    same_layout = not layout_diffs
    args.adapter_base = dict(first["adapter_base"])
    load_base(args, model, base_iteration_dir(args.adapter_base, iter_dir))
    layout_saved = saved_layout(first)
    # Adapter tensors are small: read them from every source rank and cut this rank's part (any layout).
    reshard.load_model_resharded(args, model, iter_dir, layout_saved, select=is_adapter_key)
    if same_layout:
        path = rank_file(iter_dir, *_tp_pp_rank(), args.pipeline_model_parallel_size)
        state = read_checkpoint_file(path)
        restore_training_state(args, optimizer, scheduler, state, path, fresh_start=args.finetune)
    else:  # weights only (checked above); the data position is the checkpoint's
        state = {"consumed_train_samples": first.get("consumed_train_samples", 0)}
        restore_training_state(args, optimizer, scheduler, state, iter_dir, fresh_start=True)
    torch.distributed.barrier()
    _print(f"loaded adapter checkpoint {iter_dir} (iteration {iteration}) on the base {args.adapter_base['load']}")
    if args.finetune:
        return 0, 0
    return iteration, state.get("consumed_train_samples", 0)


def _tp_pp_rank() -> Tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()


def _setting(value):
    """A recorded adapter setting in comparable form (ints and floats alike, absent flags False)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if value is None or isinstance(value, bool):
        return bool(value)
    return float(value)


def _check_same_adapter(args, saved: dict, iter_dir: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {getattr(args, k)!r}" for k in _MATCHING
             if _setting(saved.get(k)) != _setting(getattr(args, k))]
    if diffs:
        raise CheckpointError(f"{iter_dir} holds adapters with other settings ({'; '.join(diffs)}): load it with "
                              f"its flags: {' '.join(adapter_flags(saved))}")


def base_iteration_dir(adapter_base: dict, named_in: str) -> str:
    """The iteration directory of the base an adapter checkpoint names."""
    root, iteration = adapter_base["load"], adapter_base["iteration"]
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        tracked, release = read_tracker(root)
        if release and tracked == iteration:
            path = iteration_dir(root, iteration, release=True)
    if not os.path.isdir(path):
        raise CheckpointError(f"the adapters in {named_in} were trained on the base {path}, which is missing: put "
                              "that checkpoint back (adapter_base in the checkpoint names it)")
    return path


def load_base(args, model: list, iter_dir: str, first: dict = None) -> None:
    """The frozen base weights (everything but the adapters) from a full-model
    checkpoint, under any layout; QLoRA layers quantise the full tensors."""
    first = first if first is not None else first_rank_state(iter_dir)
    if "adapter_base" in first:
        raise CheckpointError(f"{iter_dir} is itself an adapter checkpoint: a base must be a full-model checkpoint "
                              "(merge the adapters into it first)")
    layout_saved = saved_layout(first)
    quantized = any(isinstance(m, QuantizedLinear) for chunk in model for m in chunk.modules())
    same_layout = all(first["layout"].get(k) == v for k, v in layout(args).items())
    t0 = time.time()
    if same_layout and not quantized and not is_torch_dist(iter_dir):
        path = rank_file(iter_dir, *_tp_pp_rank(), args.pipeline_model_parallel_size)
        state = read_checkpoint_file(path)
        for key, chunk in zip(model_keys(len(model)), model):
            module = unwrap(chunk)
            result = module.load_state_dict(sharding.match_layer_spec(state[key], module.state_dict()), strict=False)
            missing = [n for n in result.missing_keys if not is_adapter_key(n)]
            if missing or result.unexpected_keys:
                raise CheckpointError(f"{path} does not fit this model (missing {missing[:3]}, unexpected "
                                      f"{result.unexpected_keys[:3]}): is it a checkpoint of this base model?")
    else:
        quantised = set()

        def quantize_from_full(module, full: Dict[str, torch.Tensor]) -> None:
            dims = LayerDims.from_config(module.config)
            for name, layer in module.named_modules():
                if isinstance(layer, QuantizedLinear) and f"{name}.weight" in full:
                    layer.load_full_weight(full[f"{name}.weight"], dims)
                    quantised.add(layer)

        reshard.load_model_resharded(args, model, iter_dir, layout_saved, select=lambda name: not is_adapter_key(name),
                                     on_full=quantize_from_full if quantized else None)
        missing = [n for chunk in model for n, m in unwrap(chunk).named_modules()
                   if isinstance(m, QuantizedLinear) and m not in quantised]
        if missing:
            raise CheckpointError(f"{iter_dir} has no {missing[0]}.weight: it is not a checkpoint of this model")
    if quantized:
        _print(f"> quantised the base {iter_dir} to {args.lora_quant_bits} bits in {time.time() - t0:.1f} s")


def merged_adapter_state(load_dir: str) -> Tuple[dict, dict, Dict[str, torch.Tensor]]:
    """(args, adapter_base, {name: full tensor}) of the adapter checkpoint in
    `load_dir`: every adapter tensor merged over TP, named with its global
    layer index (`decoder.layers.<global i>. ...`), so each has peft's shape
    for its HF module. No process group needed."""
    chosen = iteration_to_load(load_dir)
    if chosen is None:
        raise CheckpointError(f"{load_dir} holds no checkpoint ({TRACKER_FILENAME} is missing)")
    iter_dir = chosen[0]
    first = first_rank_state(iter_dir)
    if "adapter_base" not in first:
        raise CheckpointError(f"{iter_dir} is not an adapter checkpoint (no adapter_base entry)")
    layout, saved_args = first["layout"], first["args"]
    tp, pp, vp = (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                  layout["virtual_pipeline_model_parallel_size"])
    offsets = sharding.layer_offsets(saved_args["num_layers"], pp, vp)
    merged: Dict[str, torch.Tensor] = {}
    for p in range(pp):
        states = [read_checkpoint_file(rank_file(iter_dir, t, p, pp)) for t in range(tp)]
        for v, key in enumerate(model_keys(vp or 1)):
            chunks = [sharding.to_global_names(s[key], offsets[(p, v)]) for s in states]
            merged.update(sharding.merge_tp_states(chunks, bool(saved_args["swiglu"])))
    return saved_args, dict(first["adapter_base"]), merged
