"""How megatron-core lays a GPTModel's or BertModel's state dict out over
tensor- and pipeline-parallel ranks, as data, and the split/merge functions
built on it.

Used to load a checkpoint saved under one TP/PP layout into another (model
weights), and by the checkpoint tools. Nothing here is specific to Llama: the
names are megatron-core's own state-dict names. The two models differ only in
the transformer block's name (`decoder.` in GPTModel, `encoder.` in BertModel)
and in BERT's extra modules: of those, the LM output bias is split over TP with
the vocabulary; token-type and position embeddings, the LM head's dense layer
and LayerNorm, the pooler, the binary head and a classification head are
replicated on every TP rank.

Tensor parallelism: a sharded tensor is cut along `dim` into TP x stride
equal chunks and rank r holds chunks r, r + TP, r + 2 TP, ... (stride 2 is
the gated MLP's fc1, whose rows are [gate; up] and each rank keeps its part
of both). Pipeline parallelism: `decoder.layers.<i>.` indices are local to a
model chunk; the global index adds the chunk's layer offset.
"""

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

# (state-dict name suffix, partition dim, stride or "glu": 2 when the MLP is gated).
TP_PARTITIONS: Tuple[Tuple[str, int, object], ...] = (
    ("embedding.word_embeddings.weight", 0, 1),
    ("output_layer.weight", 0, 1),
    ("self_attention.linear_qkv.weight", 0, 1),
    ("self_attention.linear_qkv.bias", 0, 1),
    ("self_attention.linear_proj.weight", 1, 1),
    ("mlp.linear_fc1.weight", 0, "glu"),
    ("mlp.linear_fc1.bias", 0, "glu"),
    ("mlp.linear_fc2.weight", 1, 1),
    # Adapters (megatron/training/peft): on column-parallel linears B and DoRA's magnitude are split like
    # the base rows, each contiguous in its HF module's rows (a linear_qkv shard holds whole query groups,
    # an fc1 shard its own gate and up rows); on row-parallel linears A is split like the base columns.
    # Not listed, hence replicated: lora_A of column-parallel linears, lora_B and magnitude of row-parallel ones.
    ("self_attention.linear_qkv.adapter.q_proj.lora_B.weight", 0, 1),
    ("self_attention.linear_qkv.adapter.k_proj.lora_B.weight", 0, 1),
    ("self_attention.linear_qkv.adapter.v_proj.lora_B.weight", 0, 1),
    ("self_attention.linear_qkv.adapter.q_proj.lora_magnitude_vector", 0, 1),
    ("self_attention.linear_qkv.adapter.k_proj.lora_magnitude_vector", 0, 1),
    ("self_attention.linear_qkv.adapter.v_proj.lora_magnitude_vector", 0, 1),
    ("mlp.linear_fc1.adapter.gate_proj.lora_B.weight", 0, 1),
    ("mlp.linear_fc1.adapter.up_proj.lora_B.weight", 0, 1),
    ("mlp.linear_fc1.adapter.gate_proj.lora_magnitude_vector", 0, 1),
    ("mlp.linear_fc1.adapter.up_proj.lora_magnitude_vector", 0, 1),
    ("self_attention.linear_proj.adapter.o_proj.lora_A.weight", 1, 1),
    ("mlp.linear_fc2.adapter.down_proj.lora_A.weight", 1, 1),
    ("output_layer.bias", 0, 1),  # BertModel's LM output bias, one entry per vocabulary row
)

# Entries whose first dimension is the (padded) vocabulary.
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")

_LAYER = re.compile(r"^(decoder|encoder)\.layers\.(\d+)\.(.*)$")

# Transformer Engine's layer spec fuses the pre-attention / pre-MLP norms into
# the following linear layer: the same weights under other names (local spec
# name suffix -> TE spec name suffix).
TE_FUSED_NORMS: Dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
FROM_TE_NORMS: Dict[str, str] = {te: local for local, te in TE_FUSED_NORMS.items()}


def rename_suffixes(state: Dict[str, torch.Tensor], table: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """`state` with every name ending in `.<old>` renamed to end in `.<new>`."""
    out = {}
    for name, value in state.items():
        for old, new in table.items():
            if name.endswith("." + old):
                name = name[: -len(old)] + new
                break
        out[name] = value
    return out


def match_layer_spec(state: Dict[str, torch.Tensor], target_names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """`state` renamed to the layer spec of a model whose state-dict names are
    `target_names`: a checkpoint written by a Transformer Engine model loads
    into a local-spec model (no TE on this machine) and the other way round.
    Its `_extra_state` entries (None outside FP8) follow the target's."""
    target = set(target_names)
    if any(n.endswith(".self_attention.linear_qkv.layer_norm_weight") for n in target):
        state = rename_suffixes(state, TE_FUSED_NORMS)
    elif any(n.endswith(".input_layernorm.weight") for n in target):
        state = rename_suffixes(state, FROM_TE_NORMS)
    out = {n: v for n, v in state.items() if not n.endswith("_extra_state") or n in target}
    out.update({n: None for n in target if n.endswith("_extra_state") and n not in out})
    return out


def tp_partition(name: str, gated_mlp: bool) -> Optional[Tuple[int, int]]:
    """(dim, stride) if `name` is split over tensor-parallel ranks, else None
    (replicated: norms, row-parallel biases, rotary buffers)."""
    for suffix, dim, stride in TP_PARTITIONS:
        if name.endswith(suffix):
            return dim, (2 if gated_mlp else 1) if stride == "glu" else stride
    return None


def split_tp(full: torch.Tensor, dim: int, stride: int, tp: int) -> List[torch.Tensor]:
    """The TP shards of a full tensor, rank by rank."""
    if full.shape[dim] % (tp * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {tp} x {stride} parts")
    chunks = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)
    return [torch.cat(chunks[r::tp], dim=dim).contiguous() for r in range(tp)]


def merge_tp(shards: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of split_tp."""
    tp = len(shards)
    per_rank = [torch.split(s, s.shape[dim] // stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][k] for k in range(stride) for r in range(tp)], dim=dim)


def layer_offsets(num_layers: int, pp: int, vp: Optional[int]) -> Dict[Tuple[int, int], int]:
    """{(pp_rank, vp_stage): global index of the chunk's first layer}."""
    chunks = vp or 1
    per_chunk = num_layers // (pp * chunks)
    return {(p, v): v * (num_layers // chunks) + p * per_chunk for p in range(pp) for v in range(chunks)}


def layer_index(name: str) -> Optional[int]:
    """The layer index in a transformer-layer entry's name; None for other entries."""
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


def to_global_names(state: Dict[str, torch.Tensor], offset: int) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        m = _LAYER.match(name)
        out[f"{m.group(1)}.layers.{int(m.group(2)) + offset}.{m.group(3)}" if m else name] = value
    return out


def to_local_names(state: Dict[str, torch.Tensor], first: int, count: int) -> Dict[str, torch.Tensor]:
    """Entries of layers [first, first + count) renamed to chunk-local indices,
    plus the non-layer entries."""
    out = {}
    for name, value in state.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = value
        elif first <= int(m.group(2)) < first + count:
            out[f"{m.group(1)}.layers.{int(m.group(2)) - first}.{m.group(3)}"] = value
    return out


def merge_tp_states(states: List[Dict[str, torch.Tensor]], gated_mlp: bool) -> Dict[str, torch.Tensor]:
    """One state dict from the TP ranks' state dicts of one pipeline chunk."""
    merged = {}
    for name, first in states[0].items():
        if not isinstance(first, torch.Tensor):
            merged[name] = first
            continue
        part = tp_partition(name, gated_mlp)
        merged[name] = first if part is None else merge_tp([s[name] for s in states], *part)
    return merged


def split_for_ranks(full_chunk: Dict[str, torch.Tensor], tp: int, gated_mlp: bool,
                    names: Optional[Iterable[str]] = None) -> List[Dict[str, torch.Tensor]]:
    """Every TP rank's part of a (pipeline-chunk-local) full state dict, rank
    by rank, restricted to `names` when given. Replicated entries (and
    non-tensors) are shared, not copied."""
    out = [{} for _ in range(tp)]
    for name in (names if names is not None else full_chunk):
        value = full_chunk[name]
        part = tp_partition(name, gated_mlp) if isinstance(value, torch.Tensor) else None
        shards = [value] * tp if part is None else split_tp(value, part[0], part[1], tp)
        for r in range(tp):
            out[r][name] = shards[r]
    return out


def shard_for_rank(full_chunk: Dict[str, torch.Tensor], tp_rank: int, tp: int, gated_mlp: bool,
                   names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """This TP rank's part of a (pipeline-chunk-local) full state dict,
    restricted to `names` when given."""
    return split_for_ranks(full_chunk, tp, gated_mlp, names)[tp_rank]


def fit_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (an embedding or output layer) with exactly `rows` rows:
    trimmed, or padded with zero rows (the padding ids are never produced by
    the tokenizer)."""
    if weight.shape[0] > rows:
        return weight[:rows].contiguous()
    if weight.shape[0] < rows:
        return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])
    return weight
