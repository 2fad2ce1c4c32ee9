"""QLoRA's frozen base: megatron-core's four linear layers of each
transformer layer with their weights stored quantised, per TP shard, as
buffers (never parameters), dequantised in forward and again in backward.

Formats (bitsandbytes', so the dequantised base equals what transformers +
bitsandbytes load from the same Hugging Face checkpoint):
- 4 bits: NF4 in blocks of 64 consecutive elements of each HF weight matrix
  (row-major), one fp32 absmax per block, no double quantisation:
  bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4").
- 8 bits: LLM.int8()'s row-wise format: int8 codes and one absmax per row of
  the weight cast to fp16 (bitsandbytes.nn.Int8Params),
  bitsandbytes.functional.int8_vectorwise_quant.

Where quantisation happens: when the base checkpoint is loaded
(peft/checkpoint.py), from the FULL megatron-core tensor of each layer: it is
cut into its HF matrices (q/k/v, gate/up), each is quantised whole, and only
then are codes and scales arranged in megatron-core's row order and sliced to
this rank's TP shard. So the quantisation does not depend on the layout.

A 64-block of an HF matrix may span two rows (in_features not a multiple of
64) or two TP shards (a row-parallel shard narrower than 64 columns). The
shard therefore keeps one absmax per *piece*: `piece` = gcd(64, in_features,
local columns) consecutive elements of a row, which never straddle a block;
a block cut into several pieces repeats its absmax (for the usual sizes the
piece is the block itself).

Float state is kept as int32 bit patterns (`.view(torch.float32)` to read):
Float16Module casts every floating-point buffer to bf16/fp16, which would
round the scales; integer buffers only move with the module's device.
"""

import logging
import math
from typing import Tuple

import torch
from torch import nn

from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

from megatron.training import sharding
from megatron.training.peft.targets import LAYOUT, MODULES, LayerDims, join_from_hf, split_to_hf

BLOCKSIZE = 64
_INT8_SCALE = 7.874015718698502e-3  # 1/127, bitsandbytes' constant for int8 dequantisation


def _bnb():
    # Its CPU backend logs at import that an optional fused CPU 4-bit matmul kernel is missing; we
    # never call bitsandbytes' matmuls (the base is dequantised here), so the message is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("--lora-quant-bits needs bitsandbytes (pip install bitsandbytes): it defines the NF4 and "
                          "int8 formats the base is stored in") from e
    return bitsandbytes


def nf4_code(device) -> torch.Tensor:
    """bitsandbytes' 16 NF4 values (fp32)."""
    return _bnb().functional.get_4bit_type("nf4", device=device)


def piece_size(in_features: int, in_local: int) -> int:
    return math.gcd(BLOCKSIZE, math.gcd(in_features, in_local))


def quantize_nf4(weight: torch.Tensor, piece: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One HF matrix [out, in] -> (codes [out, in] uint8 in 0..15, absmax [out, in / piece] fp32),
    exactly bitsandbytes' quantize_4bit(blocksize=64, nf4, no double quantisation)."""
    rows, cols = weight.shape
    packed, state = _bnb().functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4",
                                                    compress_statistics=False)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[: rows * cols].reshape(rows, cols)
    starts = torch.arange(rows, device=weight.device).unsqueeze(1) * cols \
        + torch.arange(0, cols, piece, device=weight.device).unsqueeze(0)
    return codes, state.absmax.float()[starts // BLOCKSIZE]


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One HF matrix -> (codes [out, in] int8, row absmax [out] fp32), as
    bitsandbytes' Int8Params quantises: the weight cast to fp16, then
    int8_vectorwise_quant."""
    codes, row_absmax, _ = _bnb().functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return codes, row_absmax.float()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..15 -> [out, in / 2] bytes, even column in the high nibble (bitsandbytes' order)."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def nf4_pair_table(device) -> torch.Tensor:
    """[256, 2] fp32: the two NF4 values a packed byte holds (high nibble first), so
    dequantisation indexes once per byte instead of once per element."""
    code = nf4_code(device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T with W dequantised from `layer`'s buffers in forward and again
    in backward: no weight-sized tensor is kept between the two."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.matmul(x, layer.dequantized_weight().t())

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.matmul(ctx.layer.dequantized_weight()), None


class QuantizedLinear(nn.Module):
    """A frozen megatron-core linear (column- or row-parallel per `module`'s
    kind) whose weight is stored quantised. Constructor-compatible with
    ColumnParallelLinear / RowParallelLinear in a layer spec; forward returns
    (output, bias) as they do."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = False,
                 skip_bias_add: bool = False, module: str, quant_bits: int, tp_group=None, is_expert: bool = False,
                 **unused):
        super().__init__()
        if is_expert:
            raise ValueError("QLoRA quantises dense layers only, not MoE experts")
        self.config, self.module_name, self.bits = config, module, quant_bits
        self.kind = MODULES[module]
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp, self.tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = config.sequence_parallel and self.tp > 1
        self.dtype = config.params_dtype
        column = self.kind == "column"
        self.out_local = output_size // self.tp if column else output_size
        self.in_local = input_size if column else input_size // self.tp
        if quant_bits == 4:
            if self.in_local % 2:
                raise ValueError(f"4-bit {module}: {self.in_local} input columns per TP shard is odd; NF4 packs two "
                                 "codes per byte: use a TP size leaving an even width")
            self.piece = piece_size(input_size, self.in_local)
            self.register_buffer("codes", torch.zeros(self.out_local, self.in_local // 2, dtype=torch.uint8),
                                 persistent=False)
            self.register_buffer("absmax_bits", torch.zeros(self.out_local, self.in_local // self.piece,
                                                            dtype=torch.int32), persistent=False)
            self.register_buffer("pair_bits", nf4_pair_table("cpu").view(torch.int32).clone(), persistent=False)
        elif quant_bits == 8:
            self.register_buffer("codes", torch.zeros(self.out_local, self.in_local, dtype=torch.int8),
                                 persistent=False)
            self.register_buffer("absmax_bits", torch.zeros(self.out_local, dtype=torch.int32), persistent=False)
        else:
            raise ValueError(f"--lora-quant-bits {quant_bits}: choose 4 or 8")
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_local if column else output_size, dtype=self.dtype),
                                     requires_grad=False)
            if column:
                set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.register_parameter("bias", None)

    @property
    def num_base_elements(self) -> int:
        """Elements of the weight shard this layer stands for (for parameter counts)."""
        return self.out_local * self.in_local

    def dequantized_weight(self) -> torch.Tensor:
        """This shard's weight [out_local, in_local] in the parameter dtype, bit
        for bit what bitsandbytes' dequantize_4bit / int8_vectorwise_dequant give."""
        if self.bits == 4:
            values = self.pair_bits.view(torch.float32)[self.codes.int()]  # [out, in / 2, 2]
            absmax = self.absmax_bits.view(torch.float32)
            weight = (values.view(self.out_local, -1, self.piece) * absmax.unsqueeze(-1)).view(self.out_local, -1)
        else:
            weight = self.codes * self.absmax_bits.view(torch.float32).view(-1, 1) * _INT8_SCALE
        return weight.to(self.dtype)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor, dims: LayerDims) -> None:
        """Quantise the full (unsharded) megatron-core weight of this layer
        (each HF matrix whole) and keep this rank's shard."""
        full = full.to(device=self.codes.device, dtype=self.dtype)
        codes, scales = [], []
        for part in split_to_hf(self.module_name, full, dims):
            if self.bits == 4:
                c, s = quantize_nf4(part, self.piece)
            else:
                c, s = quantize_int8(part)
                s = s.unsqueeze(1)
            codes.append(c)
            scales.append(s)
        codes = join_from_hf(self.module_name, codes, dims.groups)
        scales = join_from_hf(self.module_name, scales, dims.groups)
        dim, stride = sharding.tp_partition(f"{self.module_name}.weight", dims.gated)
        codes = sharding.split_tp(codes, dim, stride, self.tp)[self.tp_rank]
        if self.bits == 4:
            self.codes.copy_(pack_nibbles(codes))
            self.absmax_bits.copy_(sharding.split_tp(scales, dim, stride, self.tp)[self.tp_rank].view(torch.int32))
        else:
            self.codes.copy_(codes)
            rows = scales.squeeze(1)
            self.absmax_bits.copy_((sharding.split_tp(rows, 0, stride, self.tp)[self.tp_rank] if dim == 0 else rows)
                                   .view(torch.int32))

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.kind == "column":
            if self.sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                                  group=self.tp_group)
            else:
                x = mappings.copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
            out = _DequantizedLinear.apply(x, self)
        else:
            partial = _DequantizedLinear.apply(input_, self)
            if self.sequence_parallel:
                out = mappings.reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
            else:
                out = mappings.reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None

    def backward_dw(self) -> None:
        """No weight gradient to defer (megatron-core calls this with delay_wgrad_compute)."""

    def extra_repr(self) -> str:
        return (f"{self.module_name} {self.kind}-parallel, {self.bits}-bit base [{self.out_local}, {self.in_local}] "
                f"per TP shard")


def quantize_layer_spec(layer_spec, quant_bits: int) -> None:
    """Swap the four dense linears of a local-spec transformer layer for
    QuantizedLinear (in place)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    owners = {"self_attention": layer_spec.submodules.self_attention.submodules,
              "mlp": layer_spec.submodules.mlp.submodules}
    for module in LAYOUT:
        owner, attr = module.split(".")
        setattr(owners[owner], attr, ModuleSpec(module=QuantizedLinear,
                                                params={"module": module, "quant_bits": quant_bits}))
