"""The Llama-architecture decoder families (`LlamaForCausalLM`: Llama 1/2/3.x,
Code Llama, TinyLlama, ...; `MistralForCausalLM`; `Qwen2ForCausalLM`;
`Qwen3ForCausalLM`): HF <-> megatron-core tensors by the name tables of
models/hf_names.py (where the layouts are described; a family's extra tensors,
Qwen2's q/k/v biases and Qwen3's q/k norms, are rows chosen by the model's
settings), config.json <-> Megatron flags in decoder_configs.py.
"""

import json
import os
from typing import Dict, Optional, Sequence

import torch

from megatron.training.checkpoint_convert.core import (
    ConversionError, ModelSource, cast, progress,
)
from megatron.training.checkpoint_convert.hf_files import HFWeights, ShardedSafetensorsWriter
from megatron.training.checkpoint_convert.hf_tokenizer import (
    check_tokenizer_vocab, export_tokenizer, find_tokenizer,
)
from megatron.training.checkpoint_convert.decoder_configs import (  # noqa: F401 - the family interface, tasks/
    HF_MODEL_TYPES, REFUSED_MODEL_TYPES, check_llama_architecture, hf_config_from_megatron, megatron_args_from_hf,
    megatron_flags_from_hf, rope_scaling,
)
from megatron.training.models.hf_names import (
    EMBEDDING, FINAL_NORM, LLAMA_GLOBALS, OUTPUT_LAYER, decoder_layers, join_qkv, split_qkv,
)
from megatron.training.sharding import fit_vocab_rows
from megatron.training.sizes import padded_vocab_size

_HF_OF = dict(LLAMA_GLOBALS)


# ------------------------------------------------------------------ HF -> Megatron

class LlamaHFSource(ModelSource):
    """An HF decoder directory of one of the families (config.json + weights [+ tokenizer])."""

    format = "hf"

    def __init__(self, model_dir: str, tokenizer_model: Optional[str] = None, extra_flags: Sequence[str] = ()):
        self.path = os.path.abspath(model_dir)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{config_path} is missing: --load-dir must be a Hugging Face model directory "
                                  "(config.json + *.safetensors); for a Megatron checkpoint use --loader megatron")
        with open(config_path) as f:
            self.config = json.load(f)
        tokenizer = find_tokenizer(self.path, tokenizer_model)
        self.flags = megatron_flags_from_hf(self.config, tokenizer) + list(extra_flags)
        self.args = megatron_args_from_hf(self.config, tokenizer, extra_flags)
        self.vocab_size = self.config["vocab_size"]
        check_tokenizer_vocab(tokenizer, self.vocab_size, "its tokenizer.model or HF directory")
        self.weights = HFWeights(self.path)

    def embedding(self):
        return {EMBEDDING: self.weights.read([_HF_OF[EMBEDDING]])[_HF_OF[EMBEDDING]]}

    def layer(self, index):
        hf = self.weights.read(f"model.layers.{index}.{n}" for _, names, _ in decoder_layers(self.args) for n in names)
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
    for mg_name, hf_names, how in decoder_layers(args):
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
    for mg_name, hf_names, how in decoder_layers(args):
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
                  max_shard_bytes: int = 5 * 10 ** 9, tokenizer_model: Optional[str] = None,
                  hf_base_dir: Optional[str] = None) -> dict:
    """Write `source` as an HF directory of its family's class (decoder_configs.hf_family): safetensors shards
    (+ index), config.json, generation_config.json and the tokenizer files; with `hf_base_dir` (the HF
    directory the model came from) its config.json and generation_config.json, changing only what the
    exported model requires (hf_metadata.py). Returns the config written."""
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
    generation = {k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id") and v is not None}
    generation["_from_model_config"] = True
    if hf_base_dir:
        from megatron.training.checkpoint_convert.hf_metadata import write_from_base

        return write_from_base(hf_base_dir, out_dir, config, args, generation)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return config


# The family interface the checkpoint plugins use (checkpoint_convert/families.py).
hf_source = LlamaHFSource
save_hf = save_llama_hf
SAVES_FROM_HF_BASE = True  # save_hf takes hf_base_dir
VERIFY_OUTPUTS = None  # next-token logits (verify.GPT_OUTPUTS)
