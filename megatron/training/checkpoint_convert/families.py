"""Model families the checkpoint tools know, by Megatron-LM's --model-type.

Each family module provides HF_MODEL_TYPES (config.json model_type values),
hf_source(model_dir, tokenizer_model) -> ModelSource, save_hf(source, out_dir,
dtype, divisible_by, max_shard_bytes, tokenizer_model) and VERIFY_OUTPUTS
(what --verify compares; None: next-token logits), and may name relatives it
refuses, REFUSED_MODEL_TYPES {model_type: why}, and SAVES_FROM_HF_BASE = True
when save_hf takes hf_base_dir (the HF directory whose config.json the
export keeps). A new family is a new row here and a new module; the
converter core knows none of them. "GPT" reads Llama, Mistral, Qwen2 and
Qwen3 (checkpoint_convert/decoder_configs.py).
"""

import importlib
import json
import os

from megatron.training.checkpoint_convert.core import ConversionError

FAMILIES = {
    "GPT": "megatron.training.checkpoint_convert.llama",
    "BERT": "megatron.training.checkpoint_convert.bert",
}


def family(model_type: str):
    if model_type not in FAMILIES:
        raise ConversionError(f"--model-type {model_type}: choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def model_type_of_hf_dir(model_dir: str) -> str:
    """The --model-type whose family reads the HF directory's config.json."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: --load-dir must be a Hugging Face model directory "
                              "(config.json + *.safetensors); for a Megatron checkpoint use --loader megatron")
    with open(path) as f:
        kind = json.load(f).get("model_type")
    for model_type in FAMILIES:
        if kind in family(model_type).HF_MODEL_TYPES:
            return model_type
    for model_type in FAMILIES:
        why = getattr(family(model_type), "REFUSED_MODEL_TYPES", {}).get(kind)
        if why:
            known = ", ".join(t for m in FAMILIES for t in family(m).HF_MODEL_TYPES)
            raise ConversionError(f"{path} has model_type {kind!r}: {why}, which no converter family reads (they "
                                  f"read the dense models {known})")
    known = ", ".join(t for m in FAMILIES for t in family(m).HF_MODEL_TYPES)
    raise ConversionError(f"{path} has model_type {kind!r}, which no converter family reads ({known}): add a "
                          "family to megatron/training/checkpoint_convert/families.py, or a loader plugin "
                          "tools/checkpoint/loader_<family>.py")


def megatron_model_type(layer_names) -> str:
    """GPT (decoder.layers.*) or BERT (encoder.layers.*) from a checkpoint's state-dict names."""
    return "BERT" if any(n.startswith("encoder.layers.") for n in layer_names) else "GPT"
