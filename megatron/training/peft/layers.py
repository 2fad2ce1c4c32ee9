"""LoRA / RSLoRA / DoRA adapters on megatron-core's tensor-parallel linears,
with peft's maths (peft/tuners/lora/layer.py, variants.py, dora.py) and names.

An adapted linear keeps its class and state-dict names; it gains a submodule
`adapter` holding one `LoraWeights` per Hugging Face module it contains
(`adapter.q_proj.lora_A.weight`, ...). A forward hook adds the adapter's
output to the base output:

    LoRA / RSLoRA   y = base(x) + s * B A drop(x),        s = alpha / r  (alpha / sqrt(r))
    DoRA            y = base(x) + (g - 1) * base_nobias(x') + g * s * B A x',   g = m / ||W + s B A||_row
                    (x' = drop(x); the norm is detached; without active dropout base_nobias(x') is the base
                    output minus its bias, else W x' is computed again, exactly as peft does)

Tensor parallelism moves only r-wide activations between ranks:
- column-parallel (linear_qkv, linear_fc1): A replicated, B split like the base rows. The r-dim activation
  A x goes through copy_to_tensor_model_parallel_region (identity forward, all-reduce backward) so A's and
  x's gradients are complete; under sequence parallelism x is sequence-sharded, so A x is all-gathered
  (reduce-scattered backward) and A's gradient covers the local tokens only: A carries
  `sequence_parallel=True` and megatron-core's finalize_model_grads sums it over TP. The shard's
  delta rows are placed in megatron-core's order (per query group [q; k; v], or [gate; up]).
- row-parallel (linear_proj, linear_fc2): A split like the base columns, B replicated. The partial A x is
  all-reduced (under sequence parallelism reduce-scattered to this rank's tokens, so B and DoRA's
  magnitude carry `sequence_parallel=True`); DoRA's squared row norms are summed over TP before the sqrt.
- dropout on replicated activations uses the default generator, identical on every TP rank; on TP- or
  sequence-split activations it uses megatron-core's tensor-parallel RNG fork (a stream per TP rank).
"""

import contextlib
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron.training.peft.targets import LayerDims, hf_parts, local_row_order, local_rows


class LoraMatrix(nn.Module):
    """peft's lora_A / lora_B: `weight` [out, in], applied as x @ weight.T."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype):
        super().__init__()
        # torch.empty: no draw from the default generator (the values come from init_from_full).
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoraWeights(nn.Module):
    """One HF module's adapter on this rank: lora_A [r, in_local], lora_B [out_local, r]
    and, with DoRA, lora_magnitude_vector [out_local]."""

    def __init__(self, in_local: int, out_local: int, rank: int, dora: bool, dtype: torch.dtype):
        super().__init__()
        self.lora_A = LoraMatrix(rank, in_local, dtype)
        self.lora_B = LoraMatrix(out_local, rank, dtype)
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_local, dtype=dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    def delta_weight(self) -> torch.Tensor:
        """B @ A, detached ([out_local, in_local])."""
        return (self.lora_B.weight @ self.lora_A.weight).detach()


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen base weight of an adapted linear (dequantised for QLoRA), detached."""
    dequantize = getattr(base, "dequantized_weight", None)
    return (dequantize() if dequantize is not None else base.weight).detach()


def output_without_bias(base: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The base output minus its bias when the layer added it (skip_bias_add=False)."""
    if base.bias is not None and not base.skip_bias_add:
        return out - base.bias
    return out


class ParallelAdapter(nn.Module):
    """The adapters of one megatron-core linear: a child `LoraWeights` per
    targeted HF module (named after it), applied by `forward(x, base_output, base)`."""

    def __init__(self, module: str, targeted: Sequence[str], dims: LayerDims, rank: int, scaling: float,
                 dropout: float, dora: bool, sequence_parallel: bool, tp: int, dtype: torch.dtype):
        super().__init__()
        self.module_name = module
        self.parts = hf_parts(module, dims)
        self.targeted = [n for n in self.parts if n in targeted]
        self.rank, self.scaling, self.dropout, self.dora = rank, scaling, dropout, dora
        self.sequence_parallel, self.tp = sequence_parallel, tp
        self.dims = dims
        self.disabled = False  # peft/model.py adapters_disabled: the base output alone
        for name in self.targeted:
            in_local, out_local = self.local_shape(name)
            self.add_module(name, LoraWeights(in_local, out_local, rank, dora, dtype))

    def local_shape(self, name: str):
        raise NotImplementedError

    def sub(self, name: str) -> LoraWeights:
        return getattr(self, name)

    def dropout_active(self) -> bool:
        return self.training and self.dropout > 0.0

    def dropped(self, x: torch.Tensor, split_input: bool) -> torch.Tensor:
        """peft's lora_dropout; inputs split over TP ranks (or over the sequence) draw from
        megatron-core's per-rank tensor-parallel RNG stream, replicated ones from the default one."""
        if not self.dropout_active():
            return x
        fork = tensor_parallel.get_cuda_rng_tracker().fork() if split_input else contextlib.nullcontext()
        with fork:
            return F.dropout(x, self.dropout, training=True)

    def extra_repr(self) -> str:
        return (f"{self.module_name}: {', '.join(self.targeted)}; r={self.rank} scaling={self.scaling:g} "
                f"dropout={self.dropout:g}{' DoRA' if self.dora else ''}")


class ColumnParallelAdapter(ParallelAdapter):
    """Adapters on a column-parallel linear (linear_qkv, linear_fc1)."""

    def __init__(self, module, targeted, dims, rank, scaling, dropout, dora, sequence_parallel, tp, dtype):
        super().__init__(module, targeted, dims, rank, scaling, dropout, dora, sequence_parallel, tp, dtype)
        self.rows = dict(zip(self.parts, local_rows(module, dims, tp)))
        order = local_row_order(module, dims, tp)
        self.in_order = bool(torch.equal(order, torch.arange(order.numel())))
        self.register_buffer("row_order", order, persistent=False)
        # Megatron-core's local rows of each HF part, in HF order (for DoRA's per-part weight norms).
        inverse = torch.argsort(order)
        start = 0
        for name in self.parts:
            self.register_buffer(f"rows_of_{name}", inverse[start: start + self.rows[name]].clone(), persistent=False)
            start += self.rows[name]
        for name in self.targeted:
            weights = self.sub(name)
            weights.lora_A.weight.sequence_parallel = sequence_parallel
            set_tensor_model_parallel_attributes(weights.lora_B.weight, True, 0, 1)
            if dora:
                set_tensor_model_parallel_attributes(weights.lora_magnitude_vector, True, 0, 1)

    def local_shape(self, name):
        out_features, in_features = self.dims.hf_shape(name)
        return in_features, out_features // self.tp

    def shard_of_full_a(self, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        return full  # replicated

    def to_megatron_rows(self, values: Dict[str, torch.Tensor], fill: float) -> torch.Tensor:
        """Per-part tensors [..., rows of the part] -> [..., local rows] in megatron-core's
        order; parts without an adapter get `fill`."""
        like = next(iter(values.values()))
        parts = [values[n] if n in values else like.new_full(like.shape[:-1] + (self.rows[n],), fill)
                 for n in self.parts]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return joined if self.in_order else joined.index_select(-1, self.row_order)

    def to_full_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """A replicated-input activation made complete for this rank's output rows:
        all-gathered over the sequence (SP), or all-reduced in backward (no SP)."""
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True)
        return mappings.copy_to_tensor_model_parallel_region(t)

    @torch.no_grad()
    def weight_norms(self, base: nn.Module) -> Dict[str, torch.Tensor]:
        """||W + s B A|| over each output row, per targeted part (DoRA)."""
        weight = base_weight(base)
        norms = {}
        for name in self.targeted:
            rows = weight.index_select(0, getattr(self, f"rows_of_{name}"))
            norms[name] = torch.linalg.norm(rows + self.scaling * self.sub(name).delta_weight(), dim=1).to(rows.dtype)
        return norms

    def low_rank_input(self, dropped: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[A_1 x_1, ..., A_k x_k] for the targeted parts, made complete for this rank (to_full_sequence).
        One matmul per part: a concatenation of the A's would be a weight-sized copy kept for backward."""
        h = [self.sub(n).lora_A(dropped[n]) for n in self.targeted]
        return self.to_full_sequence(h[0] if len(h) == 1 else torch.cat(h, dim=-1))

    def stacked_b(self) -> torch.Tensor:
        """[B_1, ..., B_k] as one [local rows, k r] matrix in megatron-core's row order: B_i in the rows
        of its part and the columns of its A_i's output, zeros elsewhere (and in untargeted parts' rows).
        A linear of one part in order uses B itself; otherwise the matrix is a copy (kept for backward,
        planner/adapters.py counts it)."""
        blocks = [self.sub(n).lora_B.weight if n in self.targeted
                  else self.row_order.new_zeros((self.rows[n], 0), dtype=self.sub(self.targeted[0]).lora_B.weight.dtype)
                  for n in self.parts]
        b = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)
        return b if self.in_order else b.index_select(0, self.row_order)

    def forward(self, x: torch.Tensor, base_output, base: nn.Module):
        out, out_bias = base_output
        dropped = {n: self.dropped(x, split_input=self.sequence_parallel) for n in self.targeted}
        h = self.low_rank_input(dropped)
        if not self.dora:
            # out + s h B^T in one addmm: the delta lands in megatron-core's row order with no
            # full-width concatenation or row permutation of it (forward or backward).
            rows = out.shape[-1]
            return torch.addmm(out.reshape(-1, rows), h.reshape(-1, h.shape[-1]), self.stacked_b().t(),
                               alpha=self.scaling).view(out.shape), out_bias
        deltas = {n: self.sub(n).lora_B(h_n) * self.scaling for n, h_n in zip(self.targeted, h.split(self.rank, -1))}
        delta = self.to_megatron_rows(deltas, 0.0)
        norms = self.weight_norms(base)
        scale = self.to_megatron_rows({n: self.sub(n).lora_magnitude_vector / norms[n] for n in self.targeted}, 1.0)
        if self.dropout_active():
            weight = base_weight(base)
            base_parts = {n: F.linear(self.to_full_sequence(dropped[n]),
                                      weight.index_select(0, getattr(self, f"rows_of_{n}"))) for n in self.targeted}
            base_out = self.to_megatron_rows(base_parts, 0.0)
        else:
            base_out = output_without_bias(base, out)
        return out + (scale - 1) * base_out + scale * delta, out_bias


class RowParallelAdapter(ParallelAdapter):
    """The adapter on a row-parallel linear (linear_proj, linear_fc2)."""

    def __init__(self, module, targeted, dims, rank, scaling, dropout, dora, sequence_parallel, tp, dtype):
        super().__init__(module, targeted, dims, rank, scaling, dropout, dora, sequence_parallel, tp, dtype)
        for name in self.targeted:
            weights = self.sub(name)
            set_tensor_model_parallel_attributes(weights.lora_A.weight, True, 1, 1)
            weights.lora_B.weight.sequence_parallel = sequence_parallel
            if dora:
                weights.lora_magnitude_vector.sequence_parallel = sequence_parallel

    def local_shape(self, name):
        out_features, in_features = self.dims.hf_shape(name)
        return in_features // self.tp, out_features

    def shard_of_full_a(self, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        width = full.shape[1] // self.tp
        return full[:, tp_rank * width: (tp_rank + 1) * width]

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a partial product over TP; under SP keep this rank's tokens."""
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(partial)
        return mappings.reduce_from_tensor_model_parallel_region(partial)

    @torch.no_grad()
    def weight_norms(self, base: nn.Module) -> Dict[str, torch.Tensor]:
        """||W + s B A|| over each full output row: squared norms of the local
        columns summed over TP, then the square root."""
        weight = base_weight(base)
        norms = {}
        for name in self.targeted:
            combined = weight + self.scaling * self.sub(name).delta_weight()
            if self.tp == 1:
                norms[name] = torch.linalg.norm(combined, dim=1).to(weight.dtype)
                continue
            squares = combined.float().square().sum(dim=1)
            torch.distributed.all_reduce(squares, group=base.tp_group)
            norms[name] = squares.sqrt().to(weight.dtype)
        return norms

    def forward(self, x: torch.Tensor, base_output, base: nn.Module):
        out, out_bias = base_output
        (name,) = self.targeted
        weights = self.sub(name)
        dropped = self.dropped(x, split_input=self.tp > 1)
        h = self.reduce(weights.lora_A(dropped))
        if not self.dora:
            rows = out.shape[-1]
            return torch.addmm(out.reshape(-1, rows), h.reshape(-1, h.shape[-1]), weights.lora_B.weight.t(),
                               alpha=self.scaling).view(out.shape), out_bias
        delta = weights.lora_B(h) * self.scaling
        scale = weights.lora_magnitude_vector / self.weight_norms(base)[name]
        if self.dropout_active():
            base_out = self.reduce(F.linear(dropped, base_weight(base)))
        else:
            base_out = output_without_bias(base, out)
        return out + (scale - 1) * base_out + scale * delta, out_bias


ADAPTERS = {"column": ColumnParallelAdapter, "row": RowParallelAdapter}
