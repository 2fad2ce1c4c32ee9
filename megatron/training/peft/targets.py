"""Which megatron-core module holds each Hugging Face (peft) module, and where
its rows are inside a fused module and its tensor-parallel shard.

megatron-core fuses Llama's q/k/v projections into one column-parallel
`linear_qkv` whose rows are grouped per query group ([q heads of group g; k_g;
v_g]) and gate/up into `linear_fc1` ([gate; up] within each TP shard). peft
adapts each HF module on its own, so an adapted fused module carries one
adapter per HF module; this file says where each one's rows go. The
HF <-> Megatron weight layouts themselves come from the table the converters
use too (models/hf_names.py), so there is one description of them.
"""

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch

from megatron.training.errors import UserError
from megatron.training.models.hf_names import LLAMA_LAYERS, join_qkv, split_qkv

COLUMN, ROW = "column", "row"
ALL_LINEAR = "all-linear"

# HF module name -> (megatron-core module inside decoder.layers.<i>., kind). Column-parallel: A replicated,
# B split over TP like the base rows. Row-parallel: A split like the base columns, B replicated.
TARGETS: Dict[str, Tuple[str, str]] = {
    "q_proj": ("self_attention.linear_qkv", COLUMN),
    "k_proj": ("self_attention.linear_qkv", COLUMN),
    "v_proj": ("self_attention.linear_qkv", COLUMN),
    "o_proj": ("self_attention.linear_proj", ROW),
    "gate_proj": ("mlp.linear_fc1", COLUMN),
    "up_proj": ("mlp.linear_fc1", COLUMN),
    "down_proj": ("mlp.linear_fc2", ROW),
}

# megatron-core module -> (its HF modules in row order, how they combine: "qkv", "cat" or "copy").
LAYOUT: Dict[str, Tuple[Tuple[str, ...], str]] = {
    mg_name[: -len(".weight")]: (tuple(n.split(".")[-2] for n in hf_names), how)
    for mg_name, hf_names, how in LLAMA_LAYERS if mg_name[: -len(".weight")] in {m for m, _ in TARGETS.values()}
}
MODULES: Dict[str, str] = {module: kind for module, kind in TARGETS.values()}  # module -> kind


ADAPTER_MODULE = "adapter"  # the submodule of an adapted linear that holds its adapters


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict name is an adapter tensor (`...linear_qkv.adapter.q_proj.lora_A.weight`)."""
    return f".{ADAPTER_MODULE}." in name


class TargetError(UserError, ValueError):
    """Unknown or unusable --lora-target-modules; the message lists the valid names."""


def expand_targets(names: Sequence[str]) -> List[str]:
    """The HF module names to adapt, in TARGETS order; `all-linear` is all seven."""
    names = list(names)
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise TargetError(f"{ALL_LINEAR} already names every module: give it alone, not with {names}")
        return list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise TargetError(f"unknown target module(s) {', '.join(unknown)}: choose among {', '.join(TARGETS)} "
                          f"or {ALL_LINEAR}")
    if not names:
        raise TargetError(f"no target modules: name some of {', '.join(TARGETS)} or {ALL_LINEAR}")
    return [n for n in TARGETS if n in names]


def modules_to_adapt(targets: Sequence[str]) -> Dict[str, List[str]]:
    """{megatron-core module suffix: the targeted HF modules in it, in row order}."""
    out: Dict[str, List[str]] = {}
    for name in expand_targets(targets):
        out.setdefault(TARGETS[name][0], []).append(name)
    return out


@dataclasses.dataclass(frozen=True)
class LayerDims:
    """The sizes that fix every projection's shape (from a TransformerConfig)."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    gated: bool

    @classmethod
    def from_config(cls, config) -> "LayerDims":
        return cls(hidden=config.hidden_size, ffn=config.ffn_hidden_size, heads=config.num_attention_heads,
                   groups=config.num_query_groups or config.num_attention_heads,
                   head_dim=config.kv_channels or config.hidden_size // config.num_attention_heads,
                   gated=bool(config.gated_linear_unit))

    def hf_shape(self, name: str) -> Tuple[int, int]:
        """(out_features, in_features) of HF module `name`: peft's lora_A is [r, in], lora_B [out, r]."""
        q, kv = self.heads * self.head_dim, self.groups * self.head_dim
        return {"q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
                "o_proj": (self.hidden, q), "gate_proj": (self.ffn, self.hidden), "up_proj": (self.ffn, self.hidden),
                "down_proj": (self.hidden, self.ffn)}[name]


def split_to_hf(module: str, full: torch.Tensor, dims: LayerDims) -> List[torch.Tensor]:
    """A full (unsharded) megatron-core tensor of `module` cut into its HF
    modules' tensors (rows in HF order; any number of columns)."""
    how = LAYOUT[module][1]
    if how == "qkv":
        return list(split_qkv(full, dims.heads, dims.groups, dims.head_dim))
    if how == "cat":
        return list(torch.chunk(full, 2)) if dims.gated else [full]
    return [full]


def join_from_hf(module: str, parts: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Inverse of split_to_hf: HF tensors (rows in HF order) -> megatron-core's row order."""
    how = LAYOUT[module][1]
    if how == "qkv":
        return join_qkv(*parts, groups=groups)
    return torch.cat(list(parts)) if how == "cat" else parts[0]


def hf_parts(module: str, dims: LayerDims) -> Tuple[str, ...]:
    """The HF modules inside `module` (up_proj alone for a non-gated fc1 is not a Llama layout)."""
    parts, how = LAYOUT[module]
    if how == "cat" and not dims.gated:
        raise TargetError("gate_proj/up_proj adapters need Llama's gated MLP (--swiglu): this model's fc1 is not "
                          "[gate; up]; target the attention projections only")
    return parts


def local_rows(module: str, dims: LayerDims, tp: int) -> List[int]:
    """Rows of each HF module inside one TP shard of a column-parallel `module`, in hf_parts order."""
    return [dims.hf_shape(name)[0] // tp for name in hf_parts(module, dims)]


def local_row_order(module: str, dims: LayerDims, tp: int) -> torch.Tensor:
    """order[i] = position, in the concatenation of the shard's HF parts
    (hf_parts order, each in HF row order), of megatron-core's local row i.
    A TP shard of linear_qkv holds whole query groups, so the same join that
    builds the full tensor builds the shard, with groups / TP groups."""
    counts = local_rows(module, dims, tp)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    index_columns = [torch.arange(s, s + n).unsqueeze(1) for s, n in zip(starts, counts)]
    return join_from_hf(module, index_columns, dims.groups // tp).reshape(-1)
