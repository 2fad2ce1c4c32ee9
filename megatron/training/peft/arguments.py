"""The adapter flags (--lora-*), registered with the driver's parser.

    --lora-rank 8                         switches adapters on (LoRA); absent: full fine-tuning
    --lora-alpha 16 --lora-dropout 0.05   peft's lora_alpha / lora_dropout (FinLoRA's defaults)
    --lora-target-modules q_proj v_proj   Hugging Face module names, or all-linear (default: q_proj k_proj v_proj)
    --lora-use-rslora                     scale alpha / sqrt(r) instead of alpha / r
    --lora-use-dora                       DoRA: a learned magnitude per output row
    --lora-quant-bits 4|8                 QLoRA: the frozen base stored as NF4 (4) or int8 (8)

The settings are recorded in every checkpoint's `args` under these names
(lora_rank, lora_alpha, ...). This module imports neither megatron.core nor
bitsandbytes.
"""

import importlib.util
from typing import List

from megatron.training.peft.targets import ALL_LINEAR, TARGETS, TargetError, expand_targets

DEFAULT_ALPHA = 16.0
DEFAULT_DROPOUT = 0.05
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")
QUANT_BITS = (4, 8)

# The flags whose values define the adapter, as recorded in a checkpoint's args (their defaults are None,
# so giving any of them without --lora-rank is caught instead of silently training all weights).
ADAPTER_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_use_rslora",
                "lora_use_dora", "lora_quant_bits")


def add_adapter_flags(parser) -> None:
    g = parser.add_argument_group("adapters (LoRA, RSLoRA, DoRA, QLoRA)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train low-rank adapters of this rank on a frozen base (--load BASE --finetune); "
                        "absent: all weights train")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help=f"adapter scale alpha / r (alpha / sqrt(r) with --lora-use-rslora); default {DEFAULT_ALPHA:g}")
    g.add_argument("--lora-dropout", type=float, default=None,
                   help=f"dropout on each adapter's input while training; default {DEFAULT_DROPOUT}")
    g.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help=f"Hugging Face module names to adapt ({', '.join(TARGETS)}) or {ALL_LINEAR}; "
                        f"default {' '.join(DEFAULT_TARGETS)}")
    g.add_argument("--lora-use-rslora", action="store_true", default=None,
                   help="rank-stabilised LoRA: scale alpha / sqrt(r)")
    g.add_argument("--lora-use-dora", action="store_true", default=None,
                   help="DoRA: weight-decomposed adapters with a trained magnitude per output row")
    g.add_argument("--lora-quant-bits", type=int, choices=QUANT_BITS, default=None,
                   help="QLoRA: keep the frozen base linear weights as 4-bit NF4 (block 64) or 8-bit row-wise int8, "
                        "quantised as bitsandbytes does from the full weights of the --load checkpoint")


def adapters_enabled(args) -> bool:
    return getattr(args, "lora_rank", None) is not None


def validate_adapter_args(args, error) -> None:
    """Check the adapter flags and fill in their defaults; `error(message)` raises.
    Called from the driver's validate_args."""
    if not adapters_enabled(args):
        given = [f"--{k.replace('_', '-')}" for k in ADAPTER_KEYS[1:] if getattr(args, k, None) not in (None, False)]
        if given:
            verb, them = ("configures", "it") if len(given) == 1 else ("configure", "them")
            error(f"{', '.join(given)} {verb} adapters, which --lora-rank R switches on: add --lora-rank (e.g. 8), "
                  f"or drop {them} to train all weights")
        return
    if args.lora_rank < 1:
        error(f"--lora-rank {args.lora_rank}: the adapter rank must be a positive integer (e.g. 8 or 16)")
    args.lora_alpha = DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha
    args.lora_dropout = DEFAULT_DROPOUT if args.lora_dropout is None else args.lora_dropout
    args.lora_use_rslora = bool(args.lora_use_rslora)
    args.lora_use_dora = bool(args.lora_use_dora)
    if args.lora_alpha <= 0:
        error(f"--lora-alpha {args.lora_alpha:g} must be positive (the adapter output is scaled by alpha / r)")
    if not 0.0 <= args.lora_dropout < 1.0:
        error(f"--lora-dropout {args.lora_dropout:g} must be in [0, 1)")
    try:
        args.lora_target_modules = expand_targets(args.lora_target_modules or DEFAULT_TARGETS)
    except TargetError as e:
        error(f"--lora-target-modules: {e}")
    if not args.swiglu and {"gate_proj", "up_proj"} & set(args.lora_target_modules):
        error("--lora-target-modules gate_proj/up_proj need Llama's gated MLP (--swiglu); this model's fc1 has no "
              "[gate; up] halves: target q_proj k_proj v_proj o_proj down_proj instead")
    if args.lora_quant_bits is not None and importlib.util.find_spec("bitsandbytes") is None:
        error(f"--lora-quant-bits {args.lora_quant_bits} needs bitsandbytes, which defines the NF4 / int8 formats the "
              "base is stored in: pip install bitsandbytes==0.50.2")
    if args.transformer_impl != "local":
        error("adapters run on megatron-core's local layer spec: drop --transformer-impl transformer_engine (the "
              "default with --lora-rank is local; Transformer Engine's fused norm+linear layers are not adapted)")
    if args.load is None:
        error("--lora-rank trains adapters on a frozen base: give the base checkpoint with --load BASE --finetune "
              "(or --load an adapter checkpoint to resume it)")


def adapter_flags(saved_args: dict) -> List[str]:
    """The driver flags that rebuild the adapters a checkpoint's `args` record
    (empty for a checkpoint without adapters)."""
    if saved_args.get("lora_rank") is None:
        return []
    flags = ["--lora-rank", str(saved_args["lora_rank"]), "--lora-alpha", repr(float(saved_args["lora_alpha"])),
             "--lora-dropout", repr(float(saved_args["lora_dropout"])),
             "--lora-target-modules", *saved_args["lora_target_modules"]]
    flags += ["--lora-use-rslora"] if saved_args.get("lora_use_rslora") else []
    flags += ["--lora-use-dora"] if saved_args.get("lora_use_dora") else []
    if saved_args.get("lora_quant_bits") is not None:
        flags += ["--lora-quant-bits", str(saved_args["lora_quant_bits"])]
    return flags


def describe(args) -> str:
    """'LoRA r=8 alpha=16' / 'DoRA ...' / 'QLoRA-4bit RSLoRA ...' for log lines."""
    method = ("DoRA" if args.lora_use_dora else "LoRA") + ("" if not args.lora_use_rslora else " (rank-stabilised)")
    quant = f"QLoRA {args.lora_quant_bits}-bit base, " if args.lora_quant_bits else ""
    return f"{quant}{method} r={args.lora_rank} alpha={args.lora_alpha:g}"
