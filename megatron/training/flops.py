"""Model FLOPs per iteration and the throughput figures logged from them.

The count is Megatron-LM's model-FLOPs formula for a dense GPT: forward +
backward (3x the forward), two FLOPs per multiply-add, with grouped-query
attention (K and V projections shrink by groups/heads), SwiGLU (three MLP
matrices instead of two) and the logit layer. Recomputation is not counted
(model FLOPs, not hardware FLOPs), so MFU is comparable across settings.
"""

from dataclasses import dataclass

# Dense bf16 tensor-core peaks, TFLOP/s per GPU, for MFU.
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A800": 312.0,
}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    padded_vocab_size: int
    swiglu: bool

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        return cls(args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                   args.num_query_groups, args.kv_channels, args.padded_vocab_size, args.swiglu)


def flops_per_iteration(shape: ModelShape, global_batch_size: int, seq_length: int) -> float:
    """Model FLOPs of one training iteration (all ranks together)."""
    h, L = shape.hidden_size, shape.num_layers
    query_ratio = shape.kv_channels * shape.num_attention_heads / h
    gated = 1.5 if shape.swiglu else 1.0
    per_token_layer_terms = (
        # QKV and output projections (K, V scaled by groups/heads), plus QK^T and AV.
        (1.0 + shape.num_query_groups / shape.num_attention_heads + seq_length / h) * query_ratio
        # MLP: two [h, ffn] matrices, three with a gated linear unit.
        + (shape.ffn_hidden_size / h) * gated
        # Logit layer, shared out over the layers.
        + shape.padded_vocab_size / (2.0 * L * h)
    )
    return 12.0 * global_batch_size * seq_length * L * h * h * per_token_layer_terms


def iteration_work(shape: ModelShape, global_batch_size: int, seq_length: int, sequences_per_sample: int = 1,
                   trained_sequences_per_sample: int = 1):
    """(model FLOPs, tokens trained on) of one iteration whose samples each carry `sequences_per_sample`
    sequences, `trained_sequences_per_sample` of them trained on (preference tuning: chosen and rejected)
    and the rest forward-only (a live reference model: a third of a training pass's FLOPs)."""
    trained = global_batch_size * trained_sequences_per_sample
    forward_only = global_batch_size * (sequences_per_sample - trained_sequences_per_sample)
    flops = flops_per_iteration(shape, trained, seq_length) + flops_per_iteration(shape, forward_only, seq_length) / 3
    return flops, trained * seq_length


def parameter_count(shape: ModelShape, tied_embeddings: bool) -> int:
    """Parameters of the whole model (RMSNorm weights included, no biases)."""
    h = shape.hidden_size
    q = shape.num_attention_heads * shape.kv_channels
    kv = 2 * shape.num_query_groups * shape.kv_channels
    attention = h * (q + kv) + q * h
    mlp = h * shape.ffn_hidden_size * (3 if shape.swiglu else 2)
    norms = 2 * h
    embeddings = shape.padded_vocab_size * h * (1 if tied_embeddings else 2)
    return shape.num_layers * (attention + mlp + norms) + embeddings + h


@dataclass
class Throughput:
    seconds_per_iteration: float
    tflops_per_gpu: float
    tokens_per_second_per_gpu: float
    tokens_per_day: float


def throughput(flops_per_iter: float, seconds_per_iter: float, tokens_per_iter: int, world_size: int) -> Throughput:
    tflops = flops_per_iter / (seconds_per_iter * world_size * 1e12)
    tokens_per_s = tokens_per_iter / seconds_per_iter
    return Throughput(seconds_per_iter, tflops, tokens_per_s / world_size, tokens_per_s * 86400.0)
