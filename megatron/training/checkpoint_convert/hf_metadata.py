"""The metadata of an HF export taken from the Hugging Face directory the
model came from (`--saver hf --hf-base-dir DIR`; finetune.py passes its HF
base_model): that directory's files are the source of truth, and the export
changes only what the exported model requires.

config.json: the base's, key for key and in its order, except these fields,
each only when the exported model differs from what the base's file says:

    dtype, torch_dtype       the dtype of the written weights (--target-params-dtype, or the
                             checkpoint's); only the keys the base has
    vocab_size               the embedding rows written
    rope_parameters, or      the checkpoint's rotary settings (--rotary-base, --rotary-seq-len-
    rope_theta+rope_scaling  interpolation-factor, --use-rope-scaling, --rope-scaling-factor),
                             written in the base's own form (transformers 5's rope_parameters,
                             or transformers 4's pair)
    max_position_embeddings  the checkpoint's --max-position-embeddings
    rms_norm_eps             the checkpoint's --norm-epsilon

A checkpoint of another shape (layers, hidden size, heads, query groups, FFN
size, tied embeddings, biases, q/k norms) or another family than the base's
config.json describes is refused: it is not a model of that base.

generation_config.json: the base's, byte for byte (nothing in it depends on
the weights); written from the tokenizer's special tokens when the base has none.
The tokenizer files: hf_tokenizer.export_tokenizer copies the tokenizer
directory's own files (finetune.py's tokenizer is the base's directory).
"""

import json
import os
import shutil
from typing import Dict, List, Tuple

from megatron.training.checkpoint.settings import SHAPE
from megatron.training.checkpoint_convert.core import ConversionError
from megatron.training.checkpoint_convert.decoder_configs import megatron_args_from_hf

# config.json fields the written weights decide.
WEIGHT_FIELDS = ("vocab_size", "dtype", "torch_dtype")
# Model settings (flag dests) -> the config.json fields that express them ("rope": in the base's form).
SETTING_FIELDS = {
    ("rotary_base", "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor"): "rope",
    ("max_position_embeddings",): "max_position_embeddings",
    ("norm_epsilon",): "rms_norm_eps",
}
CONFIG, GENERATION = "config.json", "generation_config.json"


def read_base_config(base_dir: str) -> dict:
    path = os.path.join(base_dir, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--hf-base-dir {base_dir}: cannot read {path} ({e}): give the Hugging Face "
                              "directory the model was converted from")


def _rope_fields(base: dict, written: dict) -> dict:
    theta, scaling = written["rope_theta"], written.get("rope_scaling")
    if "rope_parameters" in base:
        return {"rope_parameters": dict(scaling or {"rope_type": "default"}, rope_theta=theta)}
    return {"rope_theta": theta, "rope_scaling": scaling}


def config_from_base(base: dict, written: dict, args: dict, base_dir: str) -> Tuple[dict, List[str]]:
    """(config.json, the changes in words) for a model with settings `args`
    whose own config.json would be `written`, from the base's `base`."""
    base_args = megatron_args_from_hf(base)
    other = [f"{k} {args[k]} (its config.json: {base_args[k]})" for k in SHAPE
             if k in args and k in base_args and args[k] != base_args[k]]
    if written["model_type"] != base.get("model_type"):
        other.insert(0, f"model_type {written['model_type']} (its config.json: {base.get('model_type')})")
    if other:
        raise ConversionError(f"--hf-base-dir {base_dir} is not this model's base: the checkpoint has "
                              f"{', '.join(other)}: give the directory the model was converted from, or drop the flag")
    config, changes = dict(base), []

    def change(fields: Dict[str, object]) -> None:
        for key, value in fields.items():
            if config.get(key) != value:
                changes.append(f"{key} {config.get(key)!r} -> {value!r}")
                config[key] = value

    change({k: written[k] for k in WEIGHT_FIELDS if k in written and (k in base or k == "vocab_size")})
    for settings, field in SETTING_FIELDS.items():
        if any(args.get(s) != base_args.get(s) for s in settings):
            change(_rope_fields(base, written) if field == "rope" else {field: written[field]})
    return config, changes


def write_from_base(base_dir: str, out_dir: str, written: dict, args: dict, generation: dict) -> dict:
    """Write config.json and generation_config.json into `out_dir` from the
    base's (the module doc); `written` and `generation` are what the saver
    would write on its own. Prints what changed; returns config.json's content."""
    config, changes = config_from_base(read_base_config(base_dir), written, args, base_dir)
    if changes:
        with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    else:
        shutil.copyfile(os.path.join(base_dir, CONFIG), os.path.join(out_dir, CONFIG))
    print(f"{CONFIG}: {base_dir}'s" + (f", with {'; '.join(changes)}" if changes else ", unchanged"), flush=True)
    if os.path.isfile(os.path.join(base_dir, GENERATION)):
        shutil.copyfile(os.path.join(base_dir, GENERATION), os.path.join(out_dir, GENERATION))
    else:
        with open(os.path.join(out_dir, GENERATION), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
    return config
