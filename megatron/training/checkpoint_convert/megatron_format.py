"""This project's per-rank checkpoints (megatron/training/checkpoint/torch_format.py) as a
conversion source and target, under any TP / PP / virtual-PP layout.

Reading: each rank file is opened memory-mapped (`torch.load(mmap=True,
weights_only=True)`) and only the tensors of the layer asked for are copied
out, then the mapping is dropped: one layer in memory at a time.

Writing: for each pipeline stage, every layer is read once, cut into its TP
shards, and each shard is spooled to a small safetensors file under the
staging directory; then each rank's file is assembled from its spool and
written. Peak memory: one full layer plus one output rank file.
"""

import os
import shutil
from typing import Dict, Optional

import torch

from megatron.training import sharding
from megatron.training.checkpoint.files import atomic_torch_save
from megatron.training.checkpoint.iterations import (
    TRACKER_FILENAME, iteration_dir, rank_dir_name, rank_file, read_checkpoint_file, read_tracker,
)
from megatron.training.checkpoint.torch_format import first_rank_state
from megatron.training.checkpoint.training_state import CHECKPOINT_VERSION, model_keys
from megatron.training.checkpoint_convert import families
from megatron.training.checkpoint_convert.core import (
    ConversionError, ModelSource, cast, check_target_layout, progress,
)
from megatron.training.checkpoint_convert.megatron_base import LINEAR_MODULES, read_vocab_size
from megatron.training.errors import CheckpointError
from megatron.training.fileio import atomic_write_text
from megatron.training.models.hf_names import EMBEDDING, OUTPUT_LAYER
from megatron.training.sizes import padded_vocab_size

class MegatronSource(ModelSource):
    """A checkpoint root written by pretrain_gpt.py or by save_megatron."""

    format = "megatron"

    def __init__(self, load_dir: str, tokenizer_model: Optional[str] = None, iter_dir: Optional[str] = None):
        """The checkpoint's latest iteration, or the iteration directory `iter_dir` of it."""
        self.path = os.path.abspath(load_dir)
        if not os.path.isdir(self.path):
            raise ConversionError(f"--load-dir {self.path} does not exist")
        try:
            iteration, release = read_tracker(self.path)
        except CheckpointError as e:
            raise ConversionError(str(e))
        if iteration is None:
            raise ConversionError(
                f"{self.path} has no {TRACKER_FILENAME}: it is not a checkpoint saved by "
                "pretrain_gpt.py (for a Hugging Face directory use --loader llama2_hf)")
        self.iter_dir = iter_dir or iteration_dir(self.path, iteration, release)
        release = os.path.basename(self.iter_dir) == "release"
        try:
            first = first_rank_state(self.iter_dir)
        except CheckpointError as e:
            raise ConversionError(str(e))
        self.args = dict(first["args"])
        layout = first["layout"]
        self.tp = layout["tensor_model_parallel_size"]
        self.pp = layout["pipeline_model_parallel_size"]
        self.vp = layout["virtual_pipeline_model_parallel_size"]
        self.iteration = None if release else first.get("iteration", iteration)
        self.consumed_train_samples = first.get("consumed_train_samples", 0)
        for p in range(self.pp):
            for t in range(self.tp):
                if not os.path.isfile(self._file(t, p)):
                    raise ConversionError(f"{self._file(t, p)} is missing: the checkpoint at {self.path} is "
                                          f"incomplete (saved with TP={self.tp}, PP={self.pp})")
                try:  # opens, and matches its checksum when it has one (--ckpt-checksum)
                    read_checkpoint_file(self._file(t, p))
                except CheckpointError as e:
                    raise ConversionError(str(e))
        self.gated = bool(self.args.get("swiglu"))
        self.offsets = sharding.layer_offsets(self.num_layers, self.pp, self.vp)
        self.per_chunk = self.num_layers // (self.pp * (self.vp or 1))
        self.vocab_size = read_vocab_size(self.args, tokenizer_model)
        last = torch.load(self._file(0, self.pp - 1), map_location="cpu", weights_only=True, mmap=True)
        names = list(last[model_keys(self.vp or 1)[-1]])
        del last
        self.has_output_layer = any(n.startswith("output_layer.") for n in names)
        self.model_type = families.megatron_model_type(names)
        self.block = "encoder" if self.model_type == "BERT" else "decoder"
        if tokenizer_model:
            self.args["tokenizer_model"] = os.path.abspath(tokenizer_model)
        self.adapter_base = first.get("adapter_base")
        if self.adapter_base is not None:
            from megatron.training.checkpoint_convert.peft import AdapterSettings

            self.adapter = AdapterSettings.from_args(self.args)
        self._tokenizer_model = tokenizer_model

    def base_iteration_dir(self) -> str:
        """The iteration directory of the base an adapter-only checkpoint names
        (adapter_base), as the driver loads it; the base itself may be in either
        format, so megatron_checkpoint.py opens it."""
        if self.adapter_base is None:
            return super().base()  # raises: no adapters here
        from megatron.training.peft.checkpoint import base_iteration_dir

        try:
            return base_iteration_dir(self.adapter_base, self.iter_dir)
        except CheckpointError as e:
            raise ConversionError(str(e))

    def _file(self, t: int, p: int) -> str:
        return rank_file(self.iter_dir, t, p, self.pp)

    def _read(self, p: int, v: int, wanted) -> Dict[str, torch.Tensor]:
        """The tensors of chunk (p, v) whose chunk-local names `wanted(name)`
        accepts, merged over TP."""
        key = model_keys(self.vp or 1)[v]
        states = []
        for t in range(self.tp):
            chunk = torch.load(self._file(t, p), map_location="cpu", weights_only=True, mmap=True)[key]
            # `_extra_state`: None, or Transformer Engine's FP8 scaling state (a uint8 tensor since TE 1.14),
            # which does not carry over to another model; the saver writes fresh ones
            states.append({n: x.clone() for n, x in chunk.items()
                           if isinstance(x, torch.Tensor) and wanted(n) and not n.endswith("_extra_state")})
            del chunk  # drops the memory map
        return sharding.rename_suffixes(sharding.merge_tp_states(states, self.gated), sharding.FROM_TE_NORMS)

    def embedding(self):
        return self._read(0, 0, lambda n: n.startswith("embedding."))

    def layer(self, index):
        for (p, v), first in self.offsets.items():
            if first <= index < first + self.per_chunk:
                local = index - first
                return sharding.to_global_names(self._read(p, v, lambda n: sharding.layer_index(n) == local), first)
        raise IndexError(index)

    def final(self):
        last = (self.pp - 1, (self.vp or 1) - 1)

        def after_layers(name):
            if sharding.layer_index(name) is not None or name.startswith("embedding."):
                return False
            return not (self.tied and name == OUTPUT_LAYER)  # the tied copy is the embedding's

        return self._read(*last, after_layers)


class _Spool:
    """Per-rank TP shards of one pipeline stage, parked on disk until the rank's file is written."""

    def __init__(self, root: str, tp: int):
        self.root, self.pieces = root, [[] for _ in range(tp)]
        os.makedirs(root, exist_ok=True)

    def put(self, rank: int, chunk: int, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.root, f"{rank}_{len(self.pieces[rank])}.safetensors")
        save_file(tensors, path)
        self.pieces[rank].append((chunk, path, list(tensors)))

    def collect(self, rank: int, chunk: int) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        out = {}
        for c, path, names in self.pieces[rank]:
            if c == chunk:
                loaded = load_file(path)
                out.update((n, loaded[n]) for n in names)
                os.remove(path)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _with_extra_states(state: Dict[str, torch.Tensor], output_layer: bool) -> dict:
    out = {}
    for name, value in state.items():
        out[name] = value
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.split(".", 3)[-1] in LINEAR_MODULES:
            out[module + "._extra_state"] = None
    if output_layer:
        out["output_layer._extra_state"] = None
    return out


def save_megatron(source: ModelSource, out_dir: str, tp: int, pp: int, vp_layers: Optional[int] = None,
                  divisible_by: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                  transformer_impl: str = "local") -> dict:
    """Write `source` as a checkpoint root at `out_dir` laid out over TP x PP
    (x virtual stages of `vp_layers` layers). Returns the flags recorded in it."""
    args = source.args
    check_target_layout(args, tp, pp, vp_layers)
    layers = source.num_layers
    vp = (layers // pp) // vp_layers if vp_layers else None
    divisible_by = divisible_by or args.get("make_vocab_size_divisible_by") or 128
    rows = padded_vocab_size(source.vocab_size or args["padded_vocab_size"], divisible_by, tp)
    gated = bool(args["swiglu"])
    saved_args = dict(args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      num_layers_per_virtual_pipeline_stage=vp_layers, virtual_pipeline_model_parallel_size=vp,
                      padded_vocab_size=rows, unpadded_vocab_size=source.vocab_size,
                      make_vocab_size_divisible_by=divisible_by,
                      transformer_impl=transformer_impl)
    if dtype is not None:
        saved_args.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                          params_dtype=str(dtype).replace("torch.", ""))
    release = source.iteration is None
    iter_dir = iteration_dir(out_dir, source.iteration or 0, release)
    adapter_only = source.adapter is not None
    if adapter_only and source.adapter_base is None:
        raise ConversionError(f"the adapter's base {source.base().path} is not one of this project's checkpoints, "
                              "which an adapter-only checkpoint must name: convert the base first (--loader llama2_hf "
                              "--saver megatron) and give that as --base-load-dir, or write the merged model "
                              "(--merge-adapters, or --saver hf)")
    chunks = vp or 1
    per_chunk = layers // (pp * chunks)
    offsets = sharding.layer_offsets(layers, pp, vp)
    te_names = sharding.TE_FUSED_NORMS if transformer_impl == "transformer_engine" else {}

    def prepare(tensors, first):
        tensors = {n: sharding.fit_vocab_rows(x, rows) if n in sharding.VOCAB_ROWS else x for n, x in tensors.items()}
        return sharding.rename_suffixes(sharding.to_local_names(cast(tensors, dtype), first, per_chunk), te_names)

    bar = progress(layers, f"writing Megatron checkpoint (TP={tp} PP={pp}{f' VP={vp}' if vp else ''})")
    for p in range(pp):
        spool = _Spool(os.path.join(out_dir, ".spool"), tp)
        for v in range(chunks):
            first = offsets[(p, v)]

            def put(tensors):
                for r, shard in enumerate(sharding.split_for_ranks(prepare(tensors, first), tp, gated)):
                    spool.put(r, v, shard)

            if (p, v) == (0, 0):
                put(source.embedding())
            for i in range(first, first + per_chunk):
                put(source.layer(i))
                bar.update(1)
            if p == pp - 1 and v == chunks - 1:
                tail = source.final()
                # the last stage keeps a copy of the tied embedding (not an adapter-only checkpoint or a
                # model without an LM output layer)
                if source.tied and pp > 1 and source.has_output_layer and not adapter_only:
                    tail[OUTPUT_LAYER] = source.embedding()[EMBEDDING]
                put(tail)
        for t in range(tp):
            state = {
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": source.iteration or 0,
                "consumed_train_samples": getattr(source, "consumed_train_samples", 0),
                "args": saved_args,
                "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                           "virtual_pipeline_model_parallel_size": vp},
            }
            if adapter_only:
                state["adapter_base"] = source.adapter_base
            for v, key in enumerate(model_keys(chunks)):
                chunk_state = spool.collect(t, v)
                # An adapter-only checkpoint holds the adapter tensors and nothing else (the base has the rest).
                last = p == pp - 1 and v == chunks - 1 and source.has_output_layer
                state[key] = chunk_state if adapter_only else _with_extra_states(chunk_state, last)
            rank_dir = os.path.join(iter_dir, rank_dir_name(t, p, pp))
            os.makedirs(rank_dir, exist_ok=True)
            atomic_torch_save(state, os.path.join(rank_dir, "model_optim_rng.pt"))
            del state
        spool.remove()
    bar.close()
    atomic_write_text(os.path.join(out_dir, TRACKER_FILENAME),
                      "release" if release else str(source.iteration))
    return saved_args
