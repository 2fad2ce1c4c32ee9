"""The Llama family (`LlamaForCausalLM`: Llama 1/2/3, Code Llama, TinyLlama, ...):
HF config.json <-> Megatron flags, and HF <-> megatron-core tensors by the
name tables of models/hf_names.py (where the layouts are described).
"""

import json
import os
from typing import Dict, List, Optional, Sequence

import torch

from megatron.training.checkpoint_convert.core import (
    ConversionError, ModelSource, cast, dtype_and_tokenizer_flags, progress,
)
from megatron.training.checkpoint_convert.hf_files import HFWeights, ShardedSafetensorsWriter
from megatron.training.checkpoint_convert.hf_tokenizer import (
    check_tokenizer_vocab, export_tokenizer, find_tokenizer,
)
from megatron.training.models.hf_names import (
    EMBEDDING, FINAL_NORM, LLAMA_GLOBALS, LLAMA_LAYERS, OUTPUT_LAYER, join_qkv, split_qkv,
)
from megatron.training.sharding import fit_vocab_rows
from megatron.training.sizes import padded_vocab_size

HF_MODEL_TYPES = ("llama",)
_HF_OF = dict(LLAMA_GLOBALS)


# ------------------------------------------------------------------ configs

def rope_scaling(config: dict):
    """(theta, scaling type or None, factor or None) from a config.json of transformers 4.x or 5.x."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if not scaling:
        return theta, None, None
    return theta, scaling.get("rope_type", scaling.get("type")), scaling.get("factor")


def _rope(config: dict):
    """(theta, linear factor or None) from a config.json of transformers 4.x or 5.x."""
    theta, kind, factor = rope_scaling(config)
    if kind is None:
        return theta, None
    if kind != "linear":
        raise ConversionError(
            f"config.json rope scaling of type {kind!r} is not supported: megatron-core's GPTModel here implements "
            "linear position interpolation only (rope_scaling type 'linear' -> --rotary-seq-len-interpolation-factor)")
    return theta, float(factor)


def megatron_flags_from_hf(config: dict, tokenizer: Optional[Sequence[str]] = None) -> List[str]:
    """The Megatron flags that build the model described by an HF Llama config.json."""
    kind = config.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {kind!r} (architectures {config.get('architectures')}), not a family this "
            f"converter knows ({', '.join(HF_MODEL_TYPES)}): add a loader plugin tools/checkpoint/loader_<family>.py")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r}: Llama models use silu (SwiGLU)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("attention_bias / mlp_bias are set in config.json: biased Llama variants are not "
                              "supported by this converter")
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta, factor = _rope(config)
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta {theta} is not an integer, which --rotary-base needs")
    positions = str(config.get("max_position_embeddings", 4096))
    flags = [
        "--num-layers", str(config["num_hidden_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--ffn-hidden-size", str(config["intermediate_size"]), "--num-attention-heads", str(heads),
        "--kv-channels", str(head_dim), "--max-position-embeddings", positions, "--seq-length", positions,
        "--position-embedding-type", "rope", "--rotary-base", str(int(theta)),
        "--normalization", "RMSNorm", "--norm-epsilon", str(config.get("rms_norm_eps", 1e-6)), "--swiglu",
        "--disable-bias-linear", "--vocab-size", str(config["vocab_size"]),
        "--init-method-std", str(config.get("initializer_range", 0.02)),
        "--attention-dropout", str(config.get("attention_dropout", 0.0)), "--hidden-dropout", "0",
    ]
    if groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", str(groups)]
    if factor is not None:
        flags += ["--rotary-seq-len-interpolation-factor", str(factor)]
    if not config.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    return flags + dtype_and_tokenizer_flags(config, tokenizer)


def check_llama_architecture(args: dict) -> None:
    wrong = {k: args.get(k) for k, want in (("normalization", "RMSNorm"), ("swiglu", True),
                                            ("position_embedding_type", "rope"), ("add_bias_linear", False),
                                            ("rotary_percent", 1.0)) if args.get(k) != want}
    if wrong:
        raise ConversionError(
            f"the checkpoint is not a Llama-architecture model ({', '.join(f'{k}={v}' for k, v in wrong.items())}): "
            "the hf saver writes LlamaForCausalLM, which needs --normalization RMSNorm --swiglu "
            "--use-rotary-position-embeddings --disable-bias-linear and --rotary-percent 1.0")


def hf_config_from_megatron(args: dict, vocab_rows: int, dtype: torch.dtype, special_ids: dict) -> dict:
    """The config.json of a Llama-architecture model (check_llama_architecture) with these Megatron flags."""
    heads = args["num_attention_heads"]
    factor = args.get("rotary_seq_len_interpolation_factor")
    dtype_name = str(dtype).replace("torch.", "")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_rows, "hidden_size": args["hidden_size"], "intermediate_size": args["ffn_hidden_size"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": heads,
        "num_key_value_heads": args.get("num_query_groups") or heads,
        "head_dim": args.get("kv_channels") or args["hidden_size"] // heads,
        "hidden_act": "silu", "max_position_embeddings": args.get("max_position_embeddings") or args["seq_length"],
        "rms_norm_eps": args["norm_epsilon"], "rope_theta": float(args.get("rotary_base", 10000)),
        "rope_scaling": {"rope_type": "linear", "factor": float(factor)} if factor else None,
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": args.get("init_method_std", 0.02), "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    config.update((k, v) for k, v in special_ids.items()
                  if v is not None and k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return config


# ------------------------------------------------------------------ HF -> Megatron

class LlamaHFSource(ModelSource):
    """An HF `LlamaForCausalLM` directory (config.json + weights [+ tokenizer])."""

    format = "hf"

    def __init__(self, model_dir: str, tokenizer_model: Optional[str] = None, extra_flags: Sequence[str] = ()):
        from megatron.training.arguments import parse_args
        from megatron.training.checkpoint.settings import args_to_dict

        self.path = os.path.abspath(model_dir)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{config_path} is missing: --load-dir must be a Hugging Face model directory "
                                  "(config.json + *.safetensors); for a Megatron checkpoint use --loader megatron")
        with open(config_path) as f:
            self.config = json.load(f)
        tokenizer = find_tokenizer(self.path, tokenizer_model)
        self.flags = megatron_flags_from_hf(self.config, tokenizer) + list(extra_flags)
        self.args = args_to_dict(parse_args(self.flags))
        self.vocab_size = self.config["vocab_size"]
        check_tokenizer_vocab(tokenizer, self.vocab_size, "its tokenizer.model or HF directory")
        self.weights = HFWeights(self.path)

    def embedding(self):
        return {EMBEDDING: self.weights.read([_HF_OF[EMBEDDING]])[_HF_OF[EMBEDDING]]}

    def layer(self, index):
        hf = self.weights.read(f"model.layers.{index}.{n}" for _, names, _ in LLAMA_LAYERS for n in names)
        return megatron_layer(hf, index, self.args)

    def final(self):
        names = [FINAL_NORM] if self.tied else [FINAL_NORM, OUTPUT_LAYER]
        hf = self.weights.read(_HF_OF[n] for n in names)
        return {n: hf[_HF_OF[n]] for n in names}


# ------------------------------------------------------------------ Megatron -> HF

def megatron_layer(hf: Dict[str, torch.Tensor], index: int, args: dict) -> Dict[str, torch.Tensor]:
    """One layer's HF tensors (model.layers.<index>.*) under megatron-core's names."""
    groups = args.get("num_query_groups") or args["num_attention_heads"]
    out = {}
    for mg_name, hf_names, how in LLAMA_LAYERS:
        parts = [hf[f"model.layers.{index}.{n}"] for n in hf_names]
        if how == "qkv":
            value = join_qkv(*parts, groups=groups)
        else:
            value = torch.cat(parts) if how == "cat" else parts[0]
        out[f"decoder.layers.{index}.{mg_name}"] = value
    return out


def hf_layer(tensors: Dict[str, torch.Tensor], index: int, args: dict) -> Dict[str, torch.Tensor]:
    """One layer's megatron-core tensors (decoder.layers.<index>.*) under HF's names."""
    heads = args["num_attention_heads"]
    groups = args.get("num_query_groups") or heads
    head_dim = args.get("kv_channels") or args["hidden_size"] // heads
    out = {}
    for mg_name, hf_names, how in LLAMA_LAYERS:
        value = tensors[f"decoder.layers.{index}.{mg_name}"]
        if how == "qkv":
            parts = split_qkv(value, heads, groups, head_dim)
        elif how == "cat":
            parts = torch.chunk(value, 2)
        else:
            parts = (value,)
        out.update((f"model.layers.{index}.{n}", p.contiguous()) for n, p in zip(hf_names, parts))
    return out


def save_llama_hf(source: ModelSource, out_dir: str, dtype: Optional[torch.dtype] = None, divisible_by: int = 1,
                  max_shard_bytes: int = 5 * 10 ** 9, tokenizer_model: Optional[str] = None) -> dict:
    """Write `source` as an HF LlamaForCausalLM directory: safetensors shards
    (+ index), config.json, generation_config.json and the tokenizer files.
    Returns the config written."""
    args = source.args
    check_llama_architecture(args)
    rows = padded_vocab_size(source.vocab_size or args["padded_vocab_size"], divisible_by, 1)
    special = {}
    if tokenizer_model:
        tokenizer = find_tokenizer(out_dir, tokenizer_model)
    else:
        tokenizer = (args.get("tokenizer_type"), args.get("tokenizer_model"))
    if tokenizer[1] and tokenizer[0] not in (None, "NullTokenizer"):
        if not os.path.exists(tokenizer[1]):
            raise ConversionError(f"the checkpoint's tokenizer {tokenizer[1]} is not on this machine: "
                                  "give it with --tokenizer-model")
        special = export_tokenizer(tokenizer[0], tokenizer[1], out_dir)

    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    first = source.embedding()
    dtype = dtype or first[EMBEDDING].dtype
    writer.add({_HF_OF[EMBEDDING]: fit_vocab_rows(cast(first, dtype)[EMBEDDING], rows)})
    del first
    bar = progress(source.num_layers, "writing HF safetensors")
    for i in range(source.num_layers):
        writer.add(hf_layer(cast(source.layer(i), dtype), i, args))
        bar.update(1)
    bar.close()
    tail = cast(source.final(), dtype)
    writer.add({_HF_OF[FINAL_NORM]: tail[FINAL_NORM]})
    if not source.tied:
        writer.add({_HF_OF[OUTPUT_LAYER]: fit_vocab_rows(tail[OUTPUT_LAYER], rows)})
    writer.close()

    config = hf_config_from_megatron(args, rows, dtype, special)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id") and v is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(dict(generation, _from_model_config=True), f, indent=2)
    return config


# The family interface the checkpoint plugins use (checkpoint_convert/families.py).
hf_source = LlamaHFSource
save_hf = save_llama_hf
VERIFY_OUTPUTS = None  # next-token logits (verify.GPT_OUTPUTS)
