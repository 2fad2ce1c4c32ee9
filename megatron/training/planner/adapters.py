"""The planner's memory model for LoRA / RSLoRA / DoRA / QLoRA training
(--lora-rank ...; megatron/training/peft/), per GPU of a pipeline stage.

- The base is frozen: it has no gradients and no optimizer state; only the
  adapters (A, B, DoRA's magnitude) are trained. Per adapted module with
  rank r, in and out features and TP size t: column-parallel (q, k, v, gate,
  up) A [r, in] replicated, B [out/t, r], magnitude [out/t]; row-parallel
  (o, down) A [r, in/t], B [out, r] and magnitude [out] replicated.
- QLoRA (--lora-quant-bits) stores the transformer layers' linear weights
  quantized, as buffers: 4-bit NF4 = 0.5 byte per weight plus one fp32
  absmax per block of 64 weights; 8-bit = 1 byte per weight plus one fp32
  absmax per row. The adapters' small index buffers are counted too, so the
  plan equals what the driver's model holds (tests/benchmarks). Embeddings, the output layer and the norms keep the
  training dtype. One linear weight at a time is dequantized for its
  matmuls: the largest one's shard is counted with the activations.
- Activations, against full fine-tuning (peft/layers.py): a frozen linear
  layer keeps no input (megatron-core's frozen-weight path saves the weight
  only), so the inputs of non-adapted layers are not kept (the attention
  output only with unfused attention: flash attention keeps it for itself);
  an adapted layer's input is kept by A (local tokens: A acts before the
  gather). Every adapted layer keeps B's r-wide input, with --lora-dropout
  each HF module's own dropped input and one-byte mask, and with DoRA the
  base and adapter outputs its magnitude gradient needs (and, with dropout,
  the gathered dropped input and a copy of the weight rows on
  column-parallel layers, where W x' is recomputed). The frozen output
  layer keeps no input, and the frozen embedding's output needs no gradient.
  Dropout masks are one byte, as on CUDA (CPU keeps them in the
  activations' dtype).
"""

import math
from typing import Dict, Tuple

from megatron.training.checkpoint_convert.peft import canonical_targets, layer_dims
from megatron.training.models.attention_backend import keeps_attention_scores
from megatron.training.peft.targets import COLUMN, TARGETS

NF4_BLOCK = 64
ABSMAX_BYTES = 4  # fp32 scale per NF4 block / per int8 row
NF4_PAIR_TABLE_BYTES = 256 * 2 * 4  # per 4-bit linear: the two fp32 NF4 values of each byte


def adapted(args) -> bool:
    return args.lora_rank is not None


def _targets(args) -> Tuple[str, ...]:
    return canonical_targets(args.lora_target_modules, "--lora-target-modules")


def _column(module: str) -> bool:
    return TARGETS[module][1] == COLUMN


def _features(args) -> Dict[str, Tuple[int, int]]:
    """HF module -> (in_features, out_features)."""
    dims = layer_dims(vars(args))
    return {name: dims.hf_shape(name)[::-1] for name in TARGETS}


def adapter_parameters_per_layer(args, tp: int) -> int:
    """Trainable adapter parameters of one transformer layer on one TP rank."""
    r, total = args.lora_rank, 0
    for module in _targets(args):
        features_in, features_out = _features(args)[module]
        if _column(module):
            total += r * features_in + features_out // tp * r + (features_out // tp if args.lora_use_dora else 0)
        else:
            total += r * features_in // tp + features_out * r + (features_out if args.lora_use_dora else 0)
    return total


def index_buffer_bytes_per_layer(args, tp: int) -> int:
    """The adapters' and QLoRA's small buffers: an adapted column-parallel linear keeps its rows'
    order and each HF part's rows (int64, twice its local rows); a 4-bit linear its table of the
    NF4 value pairs of every byte (256 x 2 fp32)."""
    total = 0
    for module in {TARGETS[name][0] for name in _targets(args) if _column(name)}:
        rows = sum(features_out for name, (_, features_out) in _features(args).items() if TARGETS[name][0] == module)
        total += 2 * 8 * rows // tp
    if args.lora_quant_bits == 4:
        total += len({module for module, _ in TARGETS.values()}) * NF4_PAIR_TABLE_BYTES
    return total


def linear_weight_shards(args, tp: int) -> Dict[str, Tuple[int, int, int]]:
    """(rows, columns, NF4 piece) on one TP rank of each HF weight matrix of a layer's four linear layers."""
    shards = {}
    for module, (features_in, features_out) in _features(args).items():
        if module in ("gate_proj", "up_proj") and not args.swiglu:
            continue
        rows, columns = (features_out // tp, features_in) if _column(module) else (features_out, features_in // tp)
        shards[module] = (rows, columns, math.gcd(NF4_BLOCK, math.gcd(features_in, columns)))
    if not args.swiglu:  # a plain MLP's fc1: one [ffn, hidden] matrix
        shards["fc1"] = (args.ffn_hidden_size // tp, args.hidden_size, math.gcd(NF4_BLOCK, args.hidden_size))
    return shards


def quantized_bytes(rows: int, columns: int, bits: int, piece: int = NF4_BLOCK) -> float:
    """Bytes of one quantized weight shard: NF4 codes two per byte and an fp32 absmax per `piece`
    of a row (a 64-block, or the part of one within a row / TP shard: peft/quantized.py), or
    int8 codes and an fp32 absmax per row."""
    if bits == 4:
        return rows * columns / 2 + rows * (columns // piece) * ABSMAX_BYTES
    return rows * columns + rows * ABSMAX_BYTES


def frozen_base_bytes(args, parameters: int, layers: int, element_bytes: int) -> float:
    """Bytes of a stage's frozen base (`parameters` of it on this GPU, `layers` transformer layers):
    as trained, or with QLoRA the layers' linear weights quantized."""
    buffers = layers * index_buffer_bytes_per_layer(args, args.tensor_model_parallel_size)
    if not args.lora_quant_bits:
        return parameters * element_bytes + buffers
    shards = linear_weight_shards(args, args.tensor_model_parallel_size).values()
    linear = layers * sum(r * c for r, c, _ in shards)
    quantized = layers * sum(quantized_bytes(r, c, args.lora_quant_bits, piece) for r, c, piece in shards)
    return (parameters - linear) * element_bytes + quantized + buffers


def dequantized_working_bytes(args, element_bytes: int) -> float:
    """QLoRA: the largest linear weight shard of a layer, dequantized for one matmul at a time."""
    if not args.lora_quant_bits:
        return 0.0
    shards = linear_weight_shards(args, args.tensor_model_parallel_size).values()
    return max(r * c for r, c, _ in shards) * element_bytes


def activation_delta_bytes(args, sequence_parallel: bool, element_bytes: int) -> float:
    """Bytes one transformer layer keeps for backward per micro-batch beyond (+)
    or below (-) full fine-tuning's count (planner.layer_activation_bytes),
    as peft/layers.py computes the adapters."""
    t = args.tensor_model_parallel_size
    r = t if sequence_parallel else 1
    e, rank = element_bytes, args.lora_rank
    tokens = args.seq_length * args.sequences_per_micro_batch
    dims = layer_dims(vars(args))
    query, key_value = dims.heads * dims.head_dim, dims.groups * dims.head_dim
    fc1_rows = dims.ffn * (2 if args.swiglu else 1)
    # megatron-core module -> (its input as full fine-tuning counts it per token, kept anyway without an
    # adapter (flash attention keeps its output, the input of linear_proj), its output rows on this rank)
    inputs = {
        "self_attention.linear_qkv": (e * dims.hidden / r, False, (query + 2 * key_value) / t),
        "self_attention.linear_proj": (e * query / t, not keeps_attention_scores(args), dims.hidden / r),
        "mlp.linear_fc1": (e * dims.hidden / r, False, fc1_rows / t),
        "mlp.linear_fc2": (e * dims.ffn / t, False, dims.hidden / r),
    }
    adapted_parts = {}
    for name in _targets(args):
        adapted_parts.setdefault(TARGETS[name][0], []).append(name)
    per_token, per_micro_batch = 0.0, 0.0
    for module, (counted, kept_anyway, out_local) in inputs.items():
        parts = adapted_parts.get(module)
        if not parts:  # frozen and not adapted: megatron-core's frozen-weight path keeps no input
            per_token -= 0 if kept_anyway else counted
            continue
        column = _column(parts[0])
        for name in parts:
            features_out, features_in = dims.hf_shape(name)
            local_in = features_in / r if column else features_in / t
            if args.lora_dropout > 0:
                per_token += (e + 1) * local_in  # each module's own dropped input and its mask
                if args.lora_use_dora and column:
                    # DoRA recomputes W x' on the gathered dropped input with a copy of its weight rows
                    per_token += e * features_in
                    per_micro_batch += e * features_out / t * features_in
        per_token += e * rank * len(parts) / (1 if column else r)  # B's input: A x, gathered (column) or reduced
        fused_parts = {"self_attention.linear_qkv": 3, "mlp.linear_fc1": 2 if args.swiglu else 1}.get(module, 1)
        if fused_parts > 1 and not args.lora_use_dora:
            # the B's of a fused linear stacked in megatron-core's row order: a copy kept for backward
            per_micro_batch += e * out_local * rank * len(parts)
        if args.lora_use_dora:
            per_token += 2 * e * out_local  # base and adapter outputs, for the magnitude's gradient
            per_micro_batch += 2 * e * out_local  # the per-row scale m / ||W + s BA|| and scale - 1
    return per_token * tokens + per_micro_batch


def stage_activation_delta(args, stage: int, hidden_bytes: float, micro_batches: int) -> float:
    """What a frozen embedding and output layer keep less than full fine-tuning, per stage:
    the output layer's input on the last stage (one micro-batch, as planner.stage_activation_bytes
    counts it), and on the first stage the first layer's input, which no longer requires grad
    (unless full recomputation makes it, peft/model.py), for each micro-batch in flight."""
    delta = 0.0
    if stage == args.pipeline_model_parallel_size - 1:
        delta -= hidden_bytes
    if stage == 0 and args.recompute_granularity != "full":
        delta -= micro_batches * hidden_bytes
    return delta
