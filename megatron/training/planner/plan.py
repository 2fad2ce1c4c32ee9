"""Plan a training run without GPUs: from the same flags as pretrain_gpt.py,
check the layout with the driver's own validation and estimate, per GPU of
each pipeline stage, the memory for weights, gradients, optimizer state and
activations; then the model FLOPs per iteration (the driver's own count), the
iteration time, tokens/s and tokens/day at an assumed TFLOP/s per GPU.

    plan = plan_from_argv(flags + ["--world-size", "64", "--gpu", "A100", "--mfu", "0.5"])
    print(format_plan(plan))

Memory model (bytes; e = bytes per element of --bf16/--fp16/fp32):
- Weights e per parameter; gradients 4 per parameter with fp32 grad buffers
  (--accumulate-allreduce-grads-in-fp32, or fp32 training), else e.
- Optimizer: Adam keeps two fp32 moments (8 bytes), plus an fp32 master copy
  (4 bytes) when the weights are bf16/fp16, plus an fp32 copy of the
  gradients (4 bytes) when the gradient buffers are not fp32. The distributed
  optimizer divides all of that by the data-parallel size.
- Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models"), counted per stored tensor so that it adapts to
  grouped-query attention (K and V are num_query_groups wide), SwiGLU (the
  first MLP projection is two ffn halves wide) and flash attention (no s x s
  scores are stored: Q, K, V and the output are). Dropout masks appear only
  when the dropout probability is above zero (torch stores none at p=0).
  Selective recomputation (megatron-core recomputes core attention) drops
  only the s x s scores, so with flash attention it saves nothing.
  Per-token scalars (norm statistics, softmax log-sum-exp) are below 1% and
  left out.
- Adapters (--lora-rank, --lora-quant-bits): the base is frozen (no
  gradients, no optimizer state), QLoRA stores its linear weights quantized;
  the memory model of that is planner/adapters.py. Stage i of a 1F1B pipeline holds min(PP - i, M) micro-batches;
  the interleaved schedule holds megatron-core's warm-up count of
  (virtual) micro-batches plus one.
- Preference tuning (--dpo, with finetune_dpo.py's flags): a sample is a pair,
  so activations are those of 2 x --micro-batch-size sequences; with
  --pref-reference copy (the default without adapters) every GPU also holds
  the frozen reference copy of its stage's weights (e bytes per parameter, no
  gradients or optimizer state). The reference's own forward runs under
  no_grad and keeps no activations (its transient working set is in the headroom).
What the model leaves out is covered by a headroom: CUDA context, NCCL
buffers, allocator fragmentation, transient buffers (all-gathers, logits
before the fp32 cross-entropy).

Imports only torch and this package's arguments/flops/attention choice: no megatron.core.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List

from megatron.training import arguments
from megatron.training.flops import PEAK_BF16_TFLOPS, ModelShape, flops_per_iteration, throughput
from megatron.training.planner import adapters
from megatron.training.preference.arguments import add_preference_args, reference_mode
from megatron.training.models.attention_backend import keeps_attention_scores
from megatron.training.sizes import padded_vocab_size

GIB = float(1 << 30)

# Device memory in GiB, as torch reports the whole device (A100/H100 80GB, H200 141GB).
GPU_MEMORY_GIB = {"A100": 80.0, "A800": 80.0, "H100": 80.0, "H800": 80.0, "H200": 141.0}

DEFAULT_MFU = 0.5
DEFAULT_HEADROOM_GIB = 8.0


def add_planner_flags(parser) -> None:
    """The planner's own flags, beside the driver's (extra_args_provider)."""
    g = parser.add_argument_group("planner")
    g.add_argument("--world-size", type=int, default=None, help="GPUs in the job (nodes x GPUs per node)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="for the per-node tokens/day figure")
    g.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default="A100")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float, default=None,
                      help=f"model FLOPs utilisation assumed, 0..1 (default {DEFAULT_MFU})")
    rate.add_argument("--tflops-per-gpu", type=float, default=None, help="assumed model TFLOP/s per GPU")
    g.add_argument("--gpu-memory-gib", type=float, default=None, help="default: the --gpu's memory")
    g.add_argument("--memory-headroom-gib", type=float, default=DEFAULT_HEADROOM_GIB,
                   help="kept free for what the plan does not model (CUDA context, NCCL, fragmentation)")
    g.add_argument("--dpo", action="store_true",
                   help="plan preference tuning (finetune_dpo.py, its --pref-* flags): pairs, and the reference copy")


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""
    stage: int
    layers: int
    parameters: int
    trainable: int  # parameters with gradients and optimizer state (all, or the adapters')
    weights: float
    gradients: float
    optimizer: float
    optimizer_replicated: float
    optimizer_distributed: float
    activations: float
    activation_options: Dict[str, float] = field(default_factory=dict)
    reference: float = 0.0  # preference tuning's frozen reference copy (--dpo, --pref-reference copy)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reference


@dataclass
class Plan:
    args: object
    parameters: int
    stages: List[StageMemory]
    flops_per_iteration: float
    tflops_per_gpu: float
    seconds_per_iteration: float
    tokens_per_second: float
    tokens_per_day: float
    tokens_per_day_per_node: float
    pipeline_bubble: float
    gpu_memory_gib: float
    headroom_gib: float

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.peak_stage.total / GIB <= self.gpu_memory_gib - self.headroom_gib


# ---------------------------------------------------------------- entry points

def _flags(extra_args_provider):
    """add_planner_flags and finetune_dpo.py's flags (for --dpo), plus an entry point's own flags
    (finetune_gpt.py's SFT flags)."""
    def add(parser):
        add_planner_flags(parser)
        if extra_args_provider is not None:
            extra_args_provider(parser)
        add_preference_args(parser)
    return add


def build_planner_parser(extra_args_provider=None):
    """pretrain_gpt.py's parser plus the planner's own flags (and `extra_args_provider`'s)."""
    return arguments.build_parser(_flags(extra_args_provider))


def plan_from_argv(argv: List[str], extra_args_provider=None) -> Plan:
    """Parse and validate the flags as the driver does, then plan; `extra_args_provider`
    adds an entry point's own flags, which do not change the plan (finetune_gpt.py's)."""
    args = arguments.parse_args(argv, extra_args_provider=_flags(extra_args_provider))
    if args.world_size is None:
        raise arguments.ArgumentError("--world-size is required: the number of GPUs (nodes x GPUs per node)")
    arguments.validate_args(args, args.world_size)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise arguments.ArgumentError(f"--mfu {args.mfu} is a fraction of the peak: give e.g. 0.5 for 50%")
    args.padded_vocab_size = padded_vocab_size(
        _vocab_size(args), args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    args.reference_mode = reference_mode(args) if args.dpo else None
    args.sequences_per_micro_batch = args.micro_batch_size * (2 if args.dpo else 1)  # a pair per sample
    return plan(args)


def plan(args) -> Plan:
    """The plan for validated args (with padded_vocab_size and the planner flags)."""
    stages = [stage_memory(args, i) for i in range(args.pipeline_model_parallel_size)]
    flops = flops_per_iteration(ModelShape.from_args(args), args.global_batch_size, args.seq_length)
    tflops = args.tflops_per_gpu or (args.mfu if args.mfu is not None else DEFAULT_MFU) * PEAK_BF16_TFLOPS[args.gpu]
    seconds = flops / (args.world_size * tflops * 1e12)
    tput = throughput(flops, seconds, args.global_batch_size * args.seq_length, args.world_size)
    pp, vp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1
    return Plan(
        args=args, parameters=model_parameters(args), stages=stages, flops_per_iteration=flops,
        tflops_per_gpu=tflops, seconds_per_iteration=seconds,
        tokens_per_second=tput.tokens_per_second_per_gpu * args.world_size, tokens_per_day=tput.tokens_per_day,
        tokens_per_day_per_node=tput.tokens_per_day * args.gpus_per_node / args.world_size,
        pipeline_bubble=(pp - 1) / (vp * args.num_microbatches),
        gpu_memory_gib=args.gpu_memory_gib or GPU_MEMORY_GIB.get(args.gpu, 80.0),
        headroom_gib=args.memory_headroom_gib,
    )


def _vocab_size(args) -> int:
    """The vocabulary the driver sizes the model for (tokenizer.tokenizer_and_vocab_size):
    the tokenizer's when --tokenizer-type is given, else --vocab-size. Planning
    often happens where the tokenizer files are not (PLAN=1 with placeholder
    paths); then --vocab-size stands in for the tokenizer's vocabulary."""
    from megatron.training.tokenizer import tokenizer_and_vocab_size

    try:
        return tokenizer_and_vocab_size(args)[1]
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer gets the same advice
        if args.vocab_size is not None:
            return args.vocab_size
        raise arguments.ArgumentError(
            f"cannot read the vocabulary size from --tokenizer-type {args.tokenizer_type} here ({exc}): "
            "add --vocab-size N (32000 for the Llama 2 tokenizer)") from exc


# ---------------------------------------------------------------- parameters

def _norm_parameters(args) -> int:
    return args.hidden_size * (1 if args.normalization == "RMSNorm" else 2)


def _layer_parameters(args, tp: int) -> int:
    """Parameters of one transformer layer on one of `tp` tensor-parallel ranks."""
    h = args.hidden_size
    q, kv = args.num_attention_heads * args.kv_channels, args.num_query_groups * args.kv_channels
    fc1 = args.ffn_hidden_size * (2 if args.swiglu else 1)
    split = h * (q + 2 * kv) + q * h + h * fc1 + args.ffn_hidden_size * h
    whole = 2 * _norm_parameters(args)
    if args.add_bias_linear or args.add_qkv_bias:  # --add-qkv-bias (Qwen2): the q/k/v biases alone
        split += q + 2 * kv
    if args.add_bias_linear:
        split += fc1
        whole += 2 * h  # row-parallel biases are not split
    if args.qk_layernorm:  # (Qwen3) one norm of q and one of k, over a head
        whole += 2 * args.kv_channels * (1 if args.normalization == "RMSNorm" else 2)
    return split // tp + whole


def _parameters(args, tp: int, layers: int, first: bool, last: bool, pp: int) -> int:
    n = layers * _layer_parameters(args, tp)
    vocab_rows = args.padded_vocab_size * args.hidden_size // tp
    if first:
        n += vocab_rows
        if args.position_embedding_type == "learned_absolute":
            n += args.max_position_embeddings * args.hidden_size
    if last:
        n += _norm_parameters(args)
        # Tied embeddings still need a copy of the word embeddings on the last stage when PP > 1.
        if args.untie_embeddings_and_output_weights or pp > 1:
            n += vocab_rows
    return n


def model_parameters(args) -> int:
    """All parameters of the model (each counted once)."""
    return _parameters(args, 1, args.num_layers, True, True, 1)


def stage_parameters(args, stage: int) -> int:
    """Parameters on one GPU of pipeline stage `stage` (its tensor-parallel shard)."""
    pp = args.pipeline_model_parallel_size
    return _parameters(args, args.tensor_model_parallel_size, args.num_layers // pp, stage == 0, stage == pp - 1, pp)


# ---------------------------------------------------------------- memory

def _element_bytes(args) -> int:
    return 2 if (args.bf16 or args.fp16) else 4


def _grad_bytes(args) -> int:
    return 4 if (args.accumulate_allreduce_grads_in_fp32 or _element_bytes(args) == 4) else 2


def optimizer_bytes_per_parameter(args) -> int:
    """Optimizer state per parameter before any distributed-optimizer sharding."""
    if args.optimizer == "adam":
        state = 8
    else:
        state = 4 if args.sgd_momentum else 0
    master = 4 if _element_bytes(args) == 2 else 0
    grad_copy = 4 if (master and _grad_bytes(args) != 4) else 0
    return state + master + grad_copy


def stage_memory(args, stage: int) -> StageMemory:
    n = stage_parameters(args, stage)
    layers = args.num_layers // args.pipeline_model_parallel_size
    trainable, weights = n, n * _element_bytes(args)
    if adapters.adapted(args):
        trainable = layers * adapters.adapter_parameters_per_layer(args, args.tensor_model_parallel_size)
        weights = adapters.frozen_base_bytes(args, n, layers, _element_bytes(args)) + trainable * _element_bytes(args)
    per_param = optimizer_bytes_per_parameter(args)
    replicated, distributed = trainable * per_param, trainable * per_param / args.data_parallel_size
    sp = args.sequence_parallel
    options = {}
    for granularity in (None, "selective", "full"):
        for with_sp in ([False, True] if args.tensor_model_parallel_size > 1 else [False]):
            label = f"{granularity or 'no'} recompute, {'SP' if with_sp else 'no SP'}"
            options[label] = stage_activation_bytes(args, stage, with_sp, granularity)
    return StageMemory(
        reference=n * _element_bytes(args) if args.reference_mode == "copy" else 0.0,
        stage=stage, layers=layers, parameters=n, trainable=trainable,
        weights=weights, gradients=trainable * _grad_bytes(args),
        optimizer=distributed if args.use_distributed_optimizer else replicated,
        optimizer_replicated=replicated, optimizer_distributed=distributed,
        activations=stage_activation_bytes(args, stage, sp, args.recompute_granularity),
        activation_options=options,
    )


def layer_activation_bytes(args, sequence_parallel: bool, selective: bool = False) -> float:
    """Bytes one transformer layer keeps for its backward pass, per micro-batch, on one GPU."""
    s, b, h = args.seq_length, args.sequences_per_micro_batch, args.hidden_size
    t, e = args.tensor_model_parallel_size, _element_bytes(args)
    r = t if sequence_parallel else 1  # what only sequence parallelism splits over TP
    q, kv = args.num_attention_heads * args.kv_channels, args.num_query_groups * args.kv_channels
    f = args.ffn_hidden_size
    per_token = (
        # Inputs of the two norms, of the QKV projection and of the first MLP projection.
        4 * e * h / r
        # Q, K, V and the attention output (the output projection's input).
        + e * (2 * q + 2 * kv) / t
        # The first MLP projection's output (two halves with SwiGLU) and the activation's output.
        + e * (f * (2 if args.swiglu else 1) + f) / t
    )
    if args.swiglu and args.bias_swiglu_fusion is False:  # None: fused where it runs (a GPU)
        per_token += e * f / t  # unfused: silu(x1) is kept for the product's backward
    if args.hidden_dropout > 0:
        per_token += 2 * h / r  # one-byte masks after attention and after the MLP
    total = s * b * per_token
    if adapters.adapted(args):
        total += adapters.activation_delta_bytes(args, sequence_parallel, e)
    if keeps_attention_scores(args) and not selective:
        # Unfused attention keeps the softmax output (and with dropout its mask and output), a x s x s.
        per_score = e + ((1 + e) if args.attention_dropout > 0 else 0)
        total += args.num_attention_heads * s * s * b * per_score / t
    return total


def micro_batches_in_flight(args, stage: int) -> int:
    """(Virtual) micro-batches whose activations stage `stage` holds at its peak."""
    pp, m = args.pipeline_model_parallel_size, args.num_microbatches
    vp = args.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return 1
    if vp == 1:
        return min(pp - stage, m)
    return min((pp - stage - 1) * 2 + (vp - 1) * pp + 1, m * vp)


def stage_activation_bytes(args, stage: int, sequence_parallel: bool, recompute) -> float:
    """Peak activation bytes on one GPU of `stage` for a recompute granularity (None, selective, full)."""
    pp, vp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1
    layers = args.num_layers // (pp * vp)  # per model chunk
    per_layer = layer_activation_bytes(args, sequence_parallel, selective=recompute == "selective")
    r = args.tensor_model_parallel_size if sequence_parallel else 1
    hidden = args.seq_length * args.sequences_per_micro_batch * args.hidden_size * _element_bytes(args) / r
    if recompute == "full":
        n = min(args.recompute_num_layers or 1, layers)
        if (args.recompute_method or "uniform") == "uniform":
            # Each group of n layers keeps only its input; backward recomputes one group at a time.
            per_chunk, working = math.ceil(layers / n) * hidden, n * per_layer
        else:
            # block: the first n layers keep only their inputs, the others everything.
            per_chunk, working = n * hidden + (layers - n) * per_layer, per_layer
    else:
        per_chunk, working = layers * per_layer, 0.0
    total = micro_batches_in_flight(args, stage) * per_chunk + working
    if adapters.adapted(args):
        total += adapters.dequantized_working_bytes(args, _element_bytes(args)) + adapters.stage_activation_delta(
            args, stage, hidden, micro_batches_in_flight(args, stage))
    if stage == pp - 1:
        # Final norm and output projection inputs, and the fp32 softmax of the cross-entropy (one micro-batch).
        tokens = args.seq_length * args.sequences_per_micro_batch
        total += 2 * hidden + 4 * tokens * args.padded_vocab_size / args.tensor_model_parallel_size
    if stage == 0 and args.hidden_dropout > 0:
        total += min(pp - stage, args.num_microbatches) * hidden / _element_bytes(args)  # embedding dropout mask
    return total


# ---------------------------------------------------------------- report

def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_plan(p: Plan) -> str:
    """The plan as text with markdown tables (GiB = 2^30 bytes)."""
    a = p.args
    vp = a.virtual_pipeline_model_parallel_size or 1
    lines = [
        f"model: {p.parameters / 1e9:.2f}B parameters ({a.num_layers} layers, hidden {a.hidden_size}, "
        f"ffn {a.ffn_hidden_size}, {a.num_attention_heads} heads, {a.num_query_groups} query groups, "
        f"vocab {a.padded_vocab_size} padded, seq {a.seq_length})",
        f"layout: world size {a.world_size} = TP {a.tensor_model_parallel_size} x PP {a.pipeline_model_parallel_size}"
        f" x DP {a.data_parallel_size} (VP {vp}); global batch {a.global_batch_size} = {a.num_microbatches} "
        f"micro-batches of {a.micro_batch_size} x DP {a.data_parallel_size}; pipeline bubble {p.pipeline_bubble:.1%}",
        *_adapter_line(p),
        "",
        f"memory per GPU (GiB) on {a.gpu} ({p.gpu_memory_gib:.0f} GiB, {p.headroom_gib:.0f} GiB kept free); "
        f"optimizer {'distributed' if a.use_distributed_optimizer else 'replicated'}, "
        f"activations with recompute={a.recompute_granularity or 'none'}, SP={'on' if a.sequence_parallel else 'off'}:",
        "",
        "| stage | layers | params/GPU | weights | grads | optimizer | (distributed / replicated) | activations | total |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in p.stages:
        lines.append(
            f"| {s.stage} | {s.layers} | {s.parameters / 1e9:.2f}B | {_gib(s.weights)} | {_gib(s.gradients)} | "
            f"{_gib(s.optimizer)} | {_gib(s.optimizer_distributed)} / {_gib(s.optimizer_replicated)} | "
            f"{_gib(s.activations)} | **{_gib(s.total)}** |")
    if any(s.reference for s in p.stages):
        lines += ["", "totals include the frozen reference copy of preference tuning (--pref-reference copy): "
                  + ", ".join(f"stage {s.stage} {_gib(s.reference)}" for s in p.stages) + " GiB per GPU"]
    labels = list(p.stages[0].activation_options)
    lines += ["", "activations per GPU (GiB) for other choices:", "",
              "| recompute, SP | " + " | ".join(f"stage {s.stage}" for s in p.stages) + " |",
              "|---|" + "---:|" * len(p.stages)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_gib(s.activation_options[label]) for s in p.stages) + " |")
    peak = p.peak_stage
    verdict = (f"fits: peak {_gib(peak.total)} GiB (stage {peak.stage}) <= {p.gpu_memory_gib:.0f} - "
               f"{p.headroom_gib:.0f} GiB" if p.fits else fit_error(p))
    lines += [
        "",
        f"FLOPs per iteration: {p.flops_per_iteration:.4e} (model FLOPs, as the training log counts them)",
        f"at {p.tflops_per_gpu:.0f} TFLOP/s per {a.gpu} "
        f"({p.tflops_per_gpu / PEAK_BF16_TFLOPS[a.gpu]:.0%} of {PEAK_BF16_TFLOPS[a.gpu]:.0f} peak): "
        f"{p.seconds_per_iteration:.2f} s per iteration, {p.tokens_per_second:,.0f} tokens/s, "
        f"{p.tokens_per_day / 1e9:.3f}B tokens/day for the job, "
        f"{p.tokens_per_day_per_node / 1e9:.3f}B tokens/day per {a.gpus_per_node}-GPU node",
        verdict,
    ]
    return "\n".join(lines)


def _adapter_line(p: Plan) -> List[str]:
    a = p.args
    if not adapters.adapted(a):
        return []
    from megatron.training.peft.arguments import describe

    s = p.stages[0]
    base = f"{a.lora_quant_bits}-bit quantized" if a.lora_quant_bits else "frozen"
    return [f"adapters: {describe(a)} on {', '.join(a.lora_target_modules)}: {s.trainable / 1e6:,.2f}M trainable "
            f"parameters per GPU of stage 0 ({s.trainable / s.parameters:.2%}); the {base} base has no gradients "
            "or optimizer state"]


def fit_error(p: Plan) -> str:
    """Why the plan does not fit, and what to change."""
    peak = p.peak_stage
    return (f"does not fit: stage {peak.stage} needs {_gib(peak.total)} GiB per GPU, more than "
            f"{p.gpu_memory_gib:.0f} - {p.headroom_gib:.0f} GiB: lower --micro-batch-size, add "
            "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1, "
            "add --sequence-parallel / --use-distributed-optimizer, or raise TP/PP")
