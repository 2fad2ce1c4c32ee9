"""Which core attention runs: Megatron-LM's --attention-backend flag x the layer spec.

    add_attention_flags(parser)       --attention-backend (Megatron-LM's flag) beside --use-flash-attn
    validate_attention_args(args)     the two flags do not contradict each other
    local_core_attention(args)        "sdpa" or "unfused": the local spec's core attention
    keeps_attention_scores(args)      does the core attention store the s x s scores (the planner's question)
    describe(args)                    the start-up line's `attention:` text

Without Transformer Engine (the local spec, and every adapter run) the core
attention is torch's scaled_dot_product_attention (models/sdpa_attention.py)
unless the flag asks for the unfused path: on GPUs torch picks the
FlashAttention, memory-efficient or cuDNN kernel per call, on CPUs its fused
flash kernel, and none of them materialises the s x s scores.
`--attention-backend unfused` (or `local`, Megatron-LM's name for
megatron-core's own DotProductAttention) restores megatron-core's unfused
softmax path. Under Transformer Engine's spec the value goes to
TransformerConfig.attention_backend, which sets TE's NVTE_*_ATTN switches,
as in Megatron-LM. --use-flash-attn stays accepted (Megatron-LM scripts
pass it) and means the fused path, which is the default.

Imports nothing from megatron.core: the planner reads it.
"""

# Megatron-LM's choices (megatron.core.transformer.enums.AttnBackend), by name.
BACKENDS = ("auto", "flash", "fused", "unfused", "local")

# --attention-backend -> the local spec's core attention.
LOCAL_CORE_ATTENTION = {
    "auto": "sdpa",
    "flash": "sdpa",
    "fused": "sdpa",
    "unfused": "unfused",
    "local": "unfused",
}

# The start-up line's words (on a GPU, torch picks SDPA's flash / memory-efficient / cuDNN kernel per call).
LOCAL_DESCRIPTION = {
    "sdpa": "local + torch SDPA (fused)",
    "unfused": "local (unfused softmax, --attention-backend {backend})",
}


def add_attention_flags(group) -> None:
    group.add_argument("--use-flash-attn", action="store_true",
                       help="fused attention (the default): Transformer Engine's when its spec runs, else torch "
                            "scaled_dot_product_attention; accepted for Megatron-LM scripts")
    group.add_argument("--attention-backend", choices=BACKENDS, default="auto",
                       help="auto/flash/fused: fused attention (torch SDPA on the local spec; under Transformer "
                            "Engine its NVTE_*_ATTN switches, as Megatron-LM); unfused/local: megatron-core's "
                            "unfused softmax path (stores the s x s scores)")


def validate_attention_args(args, error) -> None:
    """`error(message)` raises when --use-flash-attn meets an unfused --attention-backend."""
    if args.use_flash_attn and LOCAL_CORE_ATTENTION[args.attention_backend] == "unfused":
        error(f"--use-flash-attn asks for fused attention and --attention-backend {args.attention_backend} for the "
              "unfused path: drop one of them")


def local_core_attention(args) -> str:
    return LOCAL_CORE_ATTENTION[getattr(args, "attention_backend", "auto")]


def keeps_attention_scores(args) -> bool:
    """True when the core attention stores softmax(QK^T) for backward (the unfused paths)."""
    return local_core_attention(args) == "unfused"


def describe(args) -> str:
    if args.transformer_impl == "transformer_engine":
        backend = getattr(args, "attention_backend", "auto")
        return "Transformer Engine" + ("" if backend == "auto" else f" (--attention-backend {backend})")
    core = local_core_attention(args)
    return LOCAL_DESCRIPTION[core].format(backend=getattr(args, "attention_backend", "auto"))
