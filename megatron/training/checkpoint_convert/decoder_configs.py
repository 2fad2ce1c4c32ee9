"""HF config.json <-> Megatron flags for the Llama-architecture decoder
families (models/hf_names.py DECODER_FAMILIES): Llama 1/2/3.x, Mistral,
Qwen2/2.5 and Qwen3, each megatron-core's GPTModel with Llama's layer and at
most one of these settings:

    qwen2   biases on q, k and v only           --add-qkv-bias
    qwen3   RMSNorm on q and on k, per head     --qk-layernorm (head_dim, which may differ from
                                                hidden / heads, is --kv-channels for every family)

Rotary position embedding, by rope_type (transformers 4's rope_theta +
rope_scaling, or transformers 5's rope_parameters):

    default    --rotary-base
    linear     --rotary-seq-len-interpolation-factor F
    llama3     --use-rope-scaling --rope-scaling-factor F: megatron-core 0.16.1's Llama 3.x
               frequency scaling, whose low_freq_factor 1, high_freq_factor 4 and
               original_max_position_embeddings 8192 are fixed (LLAMA3_FIXED)

Refused, with one line naming what is and is not supported (never converted
approximately): any other rope_type (yarn, dynamic, longrope, ...), other
llama3 constants, sliding-window attention that can restrict the model's
context, mixture-of-experts configurations, o_proj / MLP biases, activations
other than SiLU.
"""

from typing import List, Optional, Sequence

import torch

from megatron.training.checkpoint_convert.core import ConversionError, dtype_and_tokenizer_flags
from megatron.training.models.hf_names import DECODER_FAMILIES

HF_MODEL_TYPES = tuple(DECODER_FAMILIES)
# Mixture-of-experts relatives of these families: refused by model_type (families.py names them).
REFUSED_MODEL_TYPES = {
    "mixtral": "Mixtral is a mixture-of-experts model",
    "qwen2_moe": "Qwen2-MoE is a mixture-of-experts model",
    "qwen3_moe": "Qwen3-MoE is a mixture-of-experts model",
    "llama4": "Llama 4 is a mixture-of-experts model",
}
# config.json keys that make any model_type a mixture of experts (a number above 0).
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
SUPPORTED = ("dense decoders: llama (with rope_type default, linear or llama3), mistral (without sliding "
             "window), qwen2, qwen3")
# megatron-core 0.16.1 RotaryEmbedding._apply_scaling's fixed Llama 3.x constants.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The settings that decide which family a Megatron model is (flag dests).
FAMILY_SETTINGS = ("add_qkv_bias", "qk_layernorm")


# ------------------------------------------------------------------ rope

def rope_scaling(config: dict):
    """(theta, scaling type or None, the scaling dict or None) from a config.json of transformers 4.x or 5.x."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if not scaling:
        return theta, None, None
    return theta, scaling.get("rope_type", scaling.get("type")), scaling


def _linear_flags(scaling: dict) -> List[str]:
    return ["--rotary-seq-len-interpolation-factor", str(float(scaling["factor"]))]


def _llama3_flags(scaling: dict) -> List[str]:
    differs = [f"{k} {scaling.get(k)} (megatron-core: {v:g})" for k, v in LLAMA3_FIXED.items()
               if scaling.get(k) is None or float(scaling[k]) != v]
    if differs:
        raise ConversionError(
            f"config.json rope_type 'llama3' with {', '.join(differs)}: megatron-core's Llama 3.x rope scaling "
            "fixes low_freq_factor 1, high_freq_factor 4 and original_max_position_embeddings 8192 (every Llama "
            "3.1/3.2/3.3 release), so this model cannot be converted exactly")
    return ["--use-rope-scaling", "--rope-scaling-factor", str(float(scaling["factor"]))]


# rope_type -> the Megatron flags reproducing it exactly
ROPE_FLAGS = {"linear": _linear_flags, "llama3": _llama3_flags}


def rope_flags(config: dict) -> List[str]:
    theta, kind, scaling = rope_scaling(config)
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta {theta} is not an integer, which --rotary-base needs")
    flags = ["--rotary-base", str(int(theta))]
    if kind is None:
        return flags
    if kind not in ROPE_FLAGS:
        raise ConversionError(
            f"config.json rope scaling of type {kind!r} is not supported: megatron-core's GPTModel implements "
            "linear position interpolation (rope_type 'linear') and Llama 3.x frequency scaling (rope_type 'llama3') "
            "only, not yarn, dynamic, longrope or other types")
    return flags + ROPE_FLAGS[kind](scaling)


def hf_rope(args: dict) -> Optional[dict]:
    """The rope_scaling entry of config.json for a model with these Megatron settings (None: plain rope)."""
    linear, llama3 = args.get("rotary_seq_len_interpolation_factor"), args.get("use_rope_scaling")
    if linear and llama3:
        raise ConversionError("the checkpoint uses both --rotary-seq-len-interpolation-factor and "
                              "--use-rope-scaling, which no Hugging Face rope_type expresses: export a model "
                              "trained with one of them")
    if llama3:
        return dict(rope_type="llama3", factor=float(args.get("rope_scaling_factor") or 8.0), **LLAMA3_FIXED)
    return {"rope_type": "linear", "factor": float(linear)} if linear else None


# ------------------------------------------------------------------ HF -> Megatron

def sliding_window_layers(config: dict) -> List[int]:
    """The layers transformers runs with sliding-window attention for this config.json."""
    window = config.get("sliding_window")
    if window is None or ("use_sliding_window" in config and not config["use_sliding_window"]):
        return []  # Qwen2/Qwen3 carry a sliding_window value that use_sliding_window false switches off
    layers = config["num_hidden_layers"]
    if config.get("layer_types"):
        return [i for i, kind in enumerate(config["layer_types"]) if kind == "sliding_attention"]
    if "use_sliding_window" in config:  # Qwen2/Qwen3: the layers from max_window_layers on
        return list(range(config.get("max_window_layers", layers), layers))
    return list(range(layers))  # Mistral: every layer


def check_decoder_config(config: dict) -> None:
    """Raise ConversionError (one line) for a config.json the converter cannot reproduce exactly."""
    kind = config.get("model_type")
    if kind in REFUSED_MODEL_TYPES or any((config.get(k) or 0) > 0 for k in MOE_KEYS):
        what = REFUSED_MODEL_TYPES.get(kind) or "it configures mixture-of-experts layers (" + ", ".join(
            f"{k} {config[k]}" for k in MOE_KEYS if (config.get(k) or 0) > 0) + ")"
        raise ConversionError(f"config.json has model_type {kind!r}: {what}, which this converter does not read; "
                              f"it reads {SUPPORTED}")
    if kind not in HF_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {kind!r} (architectures {config.get('architectures')}), not a family this "
            f"converter knows ({', '.join(HF_MODEL_TYPES)}): add a loader plugin tools/checkpoint/loader_<family>.py")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r}: Llama-architecture models use silu (SwiGLU)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("config.json sets attention_bias / mlp_bias: biases on o_proj or the MLP are not "
                              "supported (megatron-core biases q/k/v alone, as Qwen2 does, or every linear layer)")
    window = sliding_window_layers(config)
    context = config.get("max_position_embeddings", 4096)
    if window and config["sliding_window"] < context:
        raise ConversionError(
            f"config.json uses sliding-window attention (sliding_window {config['sliding_window']} on "
            f"{len(window)} of {config['num_hidden_layers']} layers, max_position_embeddings {context}), which is "
            "not supported: megatron-core's GPTModel attends over the whole causal context; models with "
            "sliding_window null (Mistral v0.2+) or use_sliding_window false (Qwen2/Qwen3) convert")


def megatron_flags_from_hf(config: dict, tokenizer: Optional[Sequence[str]] = None) -> List[str]:
    """The Megatron flags that build the model an HF decoder config.json describes."""
    check_decoder_config(config)
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    positions = str(config.get("max_position_embeddings", 4096))
    flags = [
        "--num-layers", str(config["num_hidden_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--ffn-hidden-size", str(config["intermediate_size"]), "--num-attention-heads", str(heads),
        "--kv-channels", str(head_dim), "--max-position-embeddings", positions, "--seq-length", positions,
        "--position-embedding-type", "rope", *rope_flags(config),
        "--normalization", "RMSNorm", "--norm-epsilon", str(config.get("rms_norm_eps", 1e-6)), "--swiglu",
        "--disable-bias-linear", "--vocab-size", str(config["vocab_size"]),
        "--init-method-std", str(config.get("initializer_range", 0.02)),
        "--attention-dropout", str(config.get("attention_dropout", 0.0)), "--hidden-dropout", "0",
    ]
    flags += [f"--{s.replace('_', '-')}" for s in DECODER_FAMILIES[config["model_type"]][1]]
    if groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", str(groups)]
    if not config.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    return flags + dtype_and_tokenizer_flags(config, tokenizer)


def megatron_args_from_hf(config: dict, tokenizer: Optional[Sequence[str]] = None,
                          extra_flags: Sequence[str] = ()) -> dict:
    """The settings (flag dests, plain values) a checkpoint converted from this
    config.json records, as the driver parses megatron_flags_from_hf's flags;
    hf_model_type (not a flag) names the HF class the export writes back."""
    from megatron.training.arguments import parse_args
    from megatron.training.checkpoint.settings import args_to_dict

    args = args_to_dict(parse_args(megatron_flags_from_hf(config, tokenizer) + list(extra_flags)))
    args["hf_model_type"] = config["model_type"]
    return args


# ------------------------------------------------------------------ Megatron -> HF

def check_llama_architecture(args: dict) -> None:
    wrong = {k: args.get(k) for k, want in (("normalization", "RMSNorm"), ("swiglu", True),
                                            ("position_embedding_type", "rope"), ("add_bias_linear", False),
                                            ("rotary_percent", 1.0)) if args.get(k) != want}
    if wrong:
        raise ConversionError(
            f"the checkpoint is not a Llama-architecture model ({', '.join(f'{k}={v}' for k, v in wrong.items())}): "
            "the hf saver writes Llama / Mistral / Qwen2 / Qwen3 decoders, which need --normalization RMSNorm "
            "--swiglu --use-rotary-position-embeddings --disable-bias-linear and --rotary-percent 1.0")


def hf_family(args: dict) -> str:
    """The HF model_type to export a Megatron decoder as: the one recorded at conversion (hf_model_type)
    when its settings are the model's, else the family those settings make (Llama without any)."""
    settings = tuple(s for s in FAMILY_SETTINGS if args.get(s))
    recorded = args.get("hf_model_type")
    if recorded in DECODER_FAMILIES and DECODER_FAMILIES[recorded][1] == settings:
        return recorded
    for kind, (_, needs) in DECODER_FAMILIES.items():
        if needs == settings:
            return kind
    raise ConversionError(f"the checkpoint combines {' and '.join('--' + s.replace('_', '-') for s in settings)}, "
                          "which no Hugging Face decoder family has (Qwen2: --add-qkv-bias; Qwen3: --qk-layernorm)")


def _qwen_window(args: dict) -> dict:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args["num_layers"]}


# model_type -> config.json entries only that family has
FAMILY_CONFIG = {
    "llama": lambda args: {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    "mistral": lambda args: {"sliding_window": None},
    "qwen2": _qwen_window,
    "qwen3": lambda args: dict(_qwen_window(args), attention_bias=False),
}


def hf_config_from_megatron(args: dict, vocab_rows: int, dtype: torch.dtype, special_ids: dict) -> dict:
    """The config.json of a Llama-architecture model (check_llama_architecture) with these Megatron flags."""
    heads = args["num_attention_heads"]
    kind = hf_family(args)
    dtype_name = str(dtype).replace("torch.", "")
    config = {
        "architectures": [DECODER_FAMILIES[kind][0]], "model_type": kind,
        "vocab_size": vocab_rows, "hidden_size": args["hidden_size"], "intermediate_size": args["ffn_hidden_size"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": heads,
        "num_key_value_heads": args.get("num_query_groups") or heads,
        "head_dim": args.get("kv_channels") or args["hidden_size"] // heads,
        "hidden_act": "silu", "max_position_embeddings": args.get("max_position_embeddings") or args["seq_length"],
        "rms_norm_eps": args["norm_epsilon"], "rope_theta": float(args.get("rotary_base", 10000)),
        "rope_scaling": hf_rope(args),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "attention_dropout": 0.0, "initializer_range": args.get("init_method_std", 0.02), "use_cache": True,
        **FAMILY_CONFIG[kind](args), "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    config.update((k, v) for k, v in special_ids.items()
                  if v is not None and k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return config
