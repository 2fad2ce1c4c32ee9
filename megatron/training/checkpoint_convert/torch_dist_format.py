"""torch_dist checkpoints (megatron-core's dist_checkpointing, this driver's
`--ckpt-format torch_dist` and Megatron-LM's default) as a conversion source
and target.

A torch_dist checkpoint holds global tensors: each layer tensor of a
GPTModel (a BertModel's `encoder.layers.*`) under one key with the layers
stacked on a leading axis (`decoder.layers.self_attention.linear_qkv.weight`:
[layers, qkv rows, hidden]), the other tensors (embeddings, final norm, BERT's
heads) under their own names, the norms under Transformer Engine's fused names (megatron-core's
local spec maps them so), tensor-parallel tensors whole. So there is no
layout to choose on either side: any TP / PP / VP loads it.

Reading: megatron-core's `dist_checkpointing.load` with a sharded state dict
that asks for one layer's slice of every key: one layer in memory at a time;
a checkpoint saved with --ckpt-checksum is verified first.
Writing: each layer is converted and spooled to a file of its own, then the
spool is memory-mapped and handed to `dist_checkpointing.save` in one call
(the format's index is written once): anonymous memory stays near one layer,
the rest is read from the page cache. Both run megatron-core in a
one-process gloo group of their own (`single_process_group`).
"""

import argparse
import contextlib
import os
import shutil
from typing import Dict, Optional

import torch

from megatron.training import sharding
from megatron.training.checkpoint.files import load_common
from megatron.training.checkpoint.iterations import TRACKER_FILENAME, iteration_dir
from megatron.training.checkpoint.torch_dist.full_tensors import GlobalTensors, global_key
from megatron.training.checkpoint_convert import families
from megatron.training.checkpoint_convert.core import ConversionError, ModelSource, cast, progress
from megatron.training.checkpoint_convert.megatron_base import LINEAR_MODULES, read_vocab_size
from megatron.training.errors import CheckpointError
from megatron.training.fileio import atomic_write_text
from megatron.training.models.hf_names import EMBEDDING, OUTPUT_LAYER
from megatron.training.sizes import padded_vocab_size


@contextlib.contextmanager
def single_process_group():
    """The torch.distributed world of one process that megatron-core's
    dist_checkpointing needs, for as long as the block runs (the CPU backend
    reroutes its CUDA calls on machines without CUDA). Reuses a group that exists."""
    from megatron.training import cpu_backend

    cpu_backend.activate()
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class TorchDistSource(ModelSource):
    """A torch_dist checkpoint root (this driver's or Megatron-LM's)."""

    format = "megatron"

    def __init__(self, load_dir: str, iter_dir: str, release: bool, tokenizer_model: Optional[str] = None):
        try:
            self._open(load_dir, iter_dir, release, tokenizer_model)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None

    def _open(self, load_dir: str, iter_dir: str, release: bool, tokenizer_model: Optional[str]) -> None:
        from megatron.training.checkpoint.torch_dist import checksums  # imports megatron.core
        from megatron.training.checkpoint.torch_dist import load as torch_dist_load

        self.path, self.iter_dir = os.path.abspath(load_dir), iter_dir
        # Saved with --ckpt-checksum: its files are checked before they are converted (as the torch format's are).
        checksums.verify(iter_dir, log=None)
        common = load_common(iter_dir)
        self.args = torch_dist_load.checkpoint_args(iter_dir)
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if self.args.get(key) is None:
                raise ConversionError(f"{iter_dir}/common.pt records no {key}: its model cannot be described")
        self.args.setdefault("num_query_groups", self.args["num_attention_heads"])
        if not self.args.get("group_query_attention"):
            self.args["num_query_groups"] = self.args["num_attention_heads"]
        self.iteration = None if release else int(common.get("iteration", 0))
        self.consumed_train_samples = int(self.args.get("consumed_train_samples") or 0)
        layout = torch_dist_load.layout_of(self.args)
        self.tp, self.pp = layout["TP"], layout["PP"]
        with single_process_group():
            self.tensors = GlobalTensors(iter_dir, self.num_layers)
        self.args["padded_vocab_size"] = self.tensors.shapes[EMBEDDING][0][0]
        self.block = self.tensors.layers.split(".")[0]
        self.model_type = families.megatron_model_type(self.tensors.layer_keys)
        # a BERT classifier has no LM output layer (a GPT model's tied one is stored as the embedding)
        self.has_output_layer = self.model_type == "GPT" or any(k.startswith("output_layer.")
                                                                for k in self.tensors.other_keys)
        self.vocab_size = read_vocab_size(self.args, tokenizer_model)
        if tokenizer_model:
            self.args["tokenizer_model"] = os.path.abspath(tokenizer_model)

    def embedding(self):
        with single_process_group():
            return self.tensors.whole([k for k in self.tensors.other_keys if k.startswith("embedding.")])

    def layer(self, index):
        with single_process_group():
            return self.tensors.layer(index)

    def final(self):
        """The final norm and the heads (BERT's LM head and output bias, pooler,
        binary or classification head); the output layer's weight when untied."""
        names = [k for k in self.tensors.other_keys
                 if not k.startswith("embedding.") and not (self.tied and k == OUTPUT_LAYER)]
        with single_process_group():
            return self.tensors.whole(names)


class _LayerSpool:
    """Each converted layer in a file of its own, read back memory-mapped."""

    def __init__(self, root: str):
        self.root, self.files = root, []
        os.makedirs(root, exist_ok=True)

    def put(self, tensors: Dict[str, torch.Tensor]) -> None:
        path = os.path.join(self.root, f"{len(self.files)}.pt")
        # A view would take its whole storage along into the file (and come back as a view).
        own = {k: v if v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
               else v.clone() for k, v in tensors.items()}
        torch.save(own, path)
        self.files.append(path)

    def mapped(self):
        for path in self.files:
            yield torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _sharded_state(source: ModelSource, spool: _LayerSpool, layers: int) -> dict:
    """megatron-core's sharded state dict of the spooled model: whole tensors,
    every layer at its index of the stacked keys, and the linear layers'
    (empty) extra states that a GPTModel (BertModel) writes."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    state, mapped = {}, list(spool.mapped())
    for name, tensor in mapped[0].items():  # the embedding
        state[name] = ShardedTensor.from_rank_offsets(name, tensor, replica_id=0)
    for i, tensors in enumerate(mapped[1:1 + layers]):
        block = next(iter(tensors)).split(".layers.")[0] + ".layers."  # decoder (GPT) or encoder (BERT)
        prefix = f"{block}{i}."
        for name, tensor in tensors.items():
            key = global_key(name[len(prefix):], block)
            state[name] = ShardedTensor.from_rank_offsets(key, tensor, (0, i, layers), replica_id=0,
                                                          prepend_axis_num=1)
        for module in LINEAR_MODULES:
            state[f"{prefix}{module}._extra_state"] = ShardedObject(f"{block}{module}._extra_state", None,
                                                                    (layers,), (i,), replica_id=0)
    for name, tensor in mapped[1 + layers].items():  # the final norm and the heads
        state[name] = ShardedTensor.from_rank_offsets(name, tensor, replica_id=0)
    return state


def save_torch_dist(source: ModelSource, out_dir: str, divisible_by: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> dict:
    """Write `source` as a torch_dist checkpoint root at `out_dir`, the
    vocabulary padded to a multiple of `divisible_by` (default: the source's,
    else 128). Weights only: an HF source becomes a `release` checkpoint, a
    Megatron source keeps its iteration and consumed samples. Returns the
    flags recorded in it."""
    from megatron.core import dist_checkpointing

    args = source.args
    layers = source.num_layers
    divisible_by = divisible_by or args.get("make_vocab_size_divisible_by") or 128
    rows = padded_vocab_size(source.vocab_size or args["padded_vocab_size"], divisible_by, 1)
    saved_args = dict(args, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                      num_layers_per_virtual_pipeline_stage=None, virtual_pipeline_model_parallel_size=None,
                      padded_vocab_size=rows, make_vocab_size_divisible_by=divisible_by, ckpt_format="torch_dist",
                      no_save_optim=True, no_save_rng=True,
                      consumed_train_samples=getattr(source, "consumed_train_samples", 0))
    if dtype is not None:
        saved_args.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                          params_dtype=str(dtype).replace("torch.", ""))
    release = source.iteration is None
    spool = _LayerSpool(os.path.join(out_dir, ".spool"))

    def fit(tensors):
        return {n: sharding.fit_vocab_rows(x, rows) if n in sharding.VOCAB_ROWS else x
                for n, x in cast(tensors, dtype).items()}

    bar = progress(layers, "converting layers for a torch_dist checkpoint")
    spool.put(fit(source.embedding()))
    for i in range(layers):
        spool.put(cast(source.layer(i), dtype))
        bar.update(1)
    spool.put(fit(source.final()))
    bar.close()
    iter_dir = iteration_dir(out_dir, source.iteration or 0, release)
    os.makedirs(iter_dir)
    state = _sharded_state(source, spool, layers)
    state.update(args=argparse.Namespace(**saved_args), checkpoint_version=3.0, iteration=source.iteration or 0)
    print("writing the torch_dist checkpoint ...", flush=True)
    with single_process_group():
        dist_checkpointing.save(state, iter_dir, content_metadata={"singleton_local_shards": False,
                                                                   "chained_optim_avoid_prefix": True})
    del state
    spool.remove()
    atomic_write_text(os.path.join(out_dir, TRACKER_FILENAME),
                      "release" if release else str(source.iteration))
    return saved_args
