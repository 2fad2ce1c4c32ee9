"""LoRA / RSLoRA / DoRA adapters <-> peft directories, for the Llama-architecture decoders (Llama,
Mistral, Qwen2, Qwen3: the same adapted modules; Qwen2's q/k/v biases stay in the base, as peft leaves them).

A peft directory (what `PeftModel.save_pretrained` writes and
`PeftModel.from_pretrained(base, dir)` reads, peft 0.21):

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora,
                                 use_dora, base_model_name_or_path, ...
    adapter_model.safetensors    base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight    [r, in_features]
                                 base_model.model.model.layers.<i>.self_attn.q_proj.lora_B.weight    [out_features, r]
                                 base_model.model.model.layers.<i>.self_attn.q_proj.lora_magnitude_vector  [out_features]  (DoRA)

The same tensors on our side (the adapter contract of megatron/training/peft/),
merged over TP, with global layer indices:

    decoder.layers.<i>.self_attention.linear_qkv.adapter.q_proj.lora_A.weight   (same shape, same values)

Which megatron-core module carries which HF module is the adapters' TARGETS
table (megatron/training/peft/targets.py); the HF module paths come from the
shared table (models/hf_names.py LLAMA_LAYERS). Nothing here imports megatron.core or peft.
"""

import json
import math
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from megatron.training.checkpoint.files import unpickling_reason
from megatron.training.checkpoint_convert.core import ConversionError
from megatron.training.errors import first_line
from megatron.training.models.hf_names import LLAMA_LAYERS
from megatron.training.peft.targets import ALL_LINEAR, TARGETS, LayerDims, TargetError, expand_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model.model.layers."

LORA_TENSORS = ("lora_A.weight", "lora_B.weight")
DORA_TENSOR = "lora_magnitude_vector"


def _hf_paths() -> Dict[str, str]:
    """HF module name -> its path inside model.layers.<i>. (self_attn.q_proj), from the converter's table."""
    paths = {}
    for _, hf_names, _ in LLAMA_LAYERS:
        for hf_name in hf_names:
            path = hf_name.rsplit(".", 1)[0]
            paths[path.rsplit(".", 1)[-1]] = path
    return {name: paths[name] for name in TARGETS}


HF_PATHS = _hf_paths()
TARGET_NAMES = tuple(TARGETS)

# adapter_config.json fields this format cannot express, with the value that means "not used".
UNSUPPORTED_CONFIG = {
    "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": None,
    "alpha_pattern": None, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    "use_qalora": False, "trainable_token_indices": None, "target_parameters": None, "exclude_modules": None,
    "alora_invocation_tokens": None, "arrow_config": None, "velora_config": None, "monteclora_config": None,
    "kasa_config": None, "use_bdlora": None,
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


REQUIRED = object()
# The adapter_config.json values read here: (test, what the value must be, default when absent or null).
# Nothing is converted: peft writes these types, and `"r": 4.7` or `"lora_alpha": "16"` is a mistake to name.
CONFIG_VALUES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "a positive integer (the adapter rank, e.g. 8)", REQUIRED),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive number (e.g. 16)", REQUIRED),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (e.g. 0.05)", 0.0),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false", False),
    "use_dora": (lambda v: isinstance(v, bool), "true or false", False),
}


def _as_written(value) -> str:
    """A JSON value as the user wrote it, with a hint for a quoted number."""
    text = json.dumps(value)
    return f"{text} (a string: write the number without quotes)" if isinstance(value, str) and _looks_numeric(value) \
        else text


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_adapter_config(adapter_dir: str, missing_hint: str) -> Tuple[dict, dict, str]:
    """(adapter_config.json's object as written, its CONFIG_VALUES checked and
    with their defaults, its path); anything else is a ConversionError naming
    the file. `missing_hint` says what --load-dir (or --adapters) must be."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: {missing_hint}")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({first_line(e)}): fix the file, or write the adapter "
                              "again with PeftModel.save_pretrained") from None
    except OSError as e:
        raise ConversionError(f"{path} cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of adapter settings "
                              "({\"peft_type\": \"LORA\", \"r\": ..., ...}), as PeftModel.save_pretrained writes")
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA: only LoRA, RSLoRA and "
                              "DoRA adapters can be imported")
    values = {}
    for key, (valid, what, default) in CONFIG_VALUES.items():
        value = values[key] = config.get(key)
        if value is None and default is not REQUIRED:
            values[key] = default
        elif value is None:
            raise ConversionError(f"{path} has no {key}: it must be {what}")
        elif not valid(value):
            raise ConversionError(f"{path}: {key} must be {what}, not {_as_written(value)}")
    return config, values, path


def layer_dims(args: dict) -> LayerDims:
    """The projection sizes of a model with these Megatron flags."""
    heads = args["num_attention_heads"]
    return LayerDims(hidden=args["hidden_size"], ffn=args["ffn_hidden_size"], heads=heads,
                     groups=args.get("num_query_groups") or heads,
                     head_dim=args.get("kv_channels") or args["hidden_size"] // heads, gated=bool(args.get("swiglu")))


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter configuration (what peft's LoraConfig and our --lora-* flags hold)."""

    rank: int
    alpha: float
    dropout: float
    targets: Tuple[str, ...]  # HF module names, in TARGET_NAMES order
    use_rslora: bool = False
    use_dora: bool = False
    quant_bits: Optional[int] = None  # the base's quantisation while training (None, 4 or 8); not a peft field

    @property
    def scaling(self) -> float:
        """The factor on B @ A, as peft computes it: alpha / r, or alpha / sqrt(r) with RSLoRA."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def tensor_names(self) -> Tuple[str, ...]:
        return LORA_TENSORS + ((DORA_TENSOR,) if self.use_dora else ())

    @classmethod
    def from_args(cls, args: dict) -> Optional["AdapterSettings"]:
        """The settings recorded in a checkpoint's args (None: no adapters)."""
        if not args.get("lora_rank"):
            return None
        return cls(rank=int(args["lora_rank"]), alpha=args["lora_alpha"], dropout=float(args.get("lora_dropout") or 0),
                   targets=canonical_targets(args["lora_target_modules"], "the checkpoint's lora_target_modules"),
                   use_rslora=bool(args.get("lora_use_rslora")), use_dora=bool(args.get("lora_use_dora")),
                   quant_bits=args.get("lora_quant_bits"))

    def to_args(self) -> dict:
        return {"lora_rank": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "lora_target_modules": list(self.targets), "lora_use_rslora": self.use_rslora,
                "lora_use_dora": self.use_dora, "lora_quant_bits": self.quant_bits}

    def peft_config(self, base_model_name_or_path: Optional[str]) -> dict:
        """adapter_config.json for peft (and vLLM, which reads r, lora_alpha, target_modules, use_rslora, use_dora)."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": self.rank, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": list(self.targets), "use_rslora": self.use_rslora,
            "use_dora": self.use_dora, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }

    def expected_shapes(self, args: dict) -> Dict[Tuple[str, str], Tuple[int, ...]]:
        """(HF module, tensor name) -> shape, for a model with these Megatron flags."""
        dims = layer_dims(args)
        shapes = {}
        for name in self.targets:
            features_out, features_in = dims.hf_shape(name)
            shapes[(name, "lora_A.weight")] = (self.rank, features_in)
            shapes[(name, "lora_B.weight")] = (features_out, self.rank)
            if self.use_dora:
                shapes[(name, DORA_TENSOR)] = (features_out,)
        return shapes


def canonical_targets(targets, where: str) -> Tuple[str, ...]:
    """HF module names (a list, or "all-linear") in TARGETS order; an unknown name is an error listing the valid ones."""
    try:
        return tuple(expand_targets([targets] if isinstance(targets, str) else list(targets)))
    except TargetError as e:
        raise ConversionError(f"{where}: {e}")


def megatron_key(layer: int, module: str, tensor: str) -> str:
    return f"decoder.layers.{layer}.{TARGETS[module][0]}.adapter.{module}.{tensor}"


def peft_key(layer: int, module: str, tensor: str) -> str:
    return f"{PEFT_PREFIX}{layer}.{HF_PATHS[module]}.{tensor}"


def layer_keys(settings: AdapterSettings, layer: int) -> Iterator[Tuple[str, str, str, str]]:
    """(HF module, tensor name, our key, peft key) of every adapter tensor of one layer."""
    for module in settings.targets:
        for tensor in settings.tensor_names:
            yield module, tensor, megatron_key(layer, module, tensor), peft_key(layer, module, tensor)


# ------------------------------------------------------------------ export

def write_peft_dir(out_dir: str, settings: AdapterSettings, layers: Iterable[Dict[str, torch.Tensor]],
                   num_layers: int, base_model_name_or_path: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> dict:
    """Write adapter_config.json and adapter_model.safetensors into `out_dir`
    from the adapter tensors of each layer (our names, global indices, in
    layer order). Every tensor the settings call for must be there, and no
    other. Returns the config written."""
    from safetensors.torch import save_file

    tensors, index = {}, -1
    for index, layer in enumerate(layers):
        layer = dict(layer)
        for _, _, ours, theirs in layer_keys(settings, index):
            if ours not in layer:
                raise ConversionError(f"the adapter checkpoint lacks {ours} (its args say targets "
                                      f"{', '.join(settings.targets)}{', DoRA' if settings.use_dora else ''})")
            value = layer.pop(ours)
            tensors[theirs] = (value.to(dtype) if dtype is not None else value).contiguous()
        if layer:
            raise ConversionError(f"the adapter checkpoint holds {sorted(layer)[0]}, which its args "
                                  f"(targets {', '.join(settings.targets)}) do not call for")
    if len(tensors) != num_layers * len(settings.targets) * len(settings.tensor_names):
        raise ConversionError(f"adapters for {index + 1} layers were read, the model has {num_layers}")
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    config = settings.peft_config(base_model_name_or_path)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config


# ------------------------------------------------------------------ import

def read_peft_config(adapter_dir: str) -> Tuple[AdapterSettings, dict]:
    """(settings, the raw config) of a peft LoRA directory; refuses what this format cannot express."""
    config, values, path = read_adapter_config(adapter_dir, f"--load-dir must be a peft adapter directory ({CONFIG_FILE} + "
                                                    f"{WEIGHTS_FILE}), as PeftModel.save_pretrained writes")
    for key, unused in UNSUPPORTED_CONFIG.items():
        value = config.get(key, unused)
        if value != unused and value not in (None, {}, []):
            raise ConversionError(f"{path}: {key}={value!r} is not supported (only plain LoRA/RSLoRA/DoRA adapters "
                                  f"on the linear layers of every layer import): remove it or set {unused!r}")
    settings = AdapterSettings(rank=values["r"], alpha=values["lora_alpha"], dropout=values["lora_dropout"],
                               targets=_targets_from_config(config.get("target_modules"), path),
                               use_rslora=values["use_rslora"], use_dora=values["use_dora"])
    return settings, config


def _targets_from_config(targets, path: str) -> Tuple[str, ...]:
    """peft's target_modules: "all-linear", or names of modules: short (q_proj) or full
    paths (model.layers.0.self_attn.q_proj), which the weights then must cover on every layer."""
    if targets is None:
        raise ConversionError(f"{path}: target_modules is null (peft's per-model default): "
                              "write the module names, e.g. [\"q_proj\", \"v_proj\"]")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise ConversionError(f"{path}: target_modules {targets!r} is a regular expression: "
                              f"list the module names instead (among {', '.join(TARGET_NAMES)})")
    if targets == ALL_LINEAR:
        return TARGET_NAMES
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConversionError(f"{path}: target_modules must be a list of module names or \"all-linear\", not "
                              f"{json.dumps(targets)}")
    return canonical_targets(sorted({t.rsplit(".", 1)[-1] for t in targets}), f"{path}: target_modules")


def read_peft_weights(adapter_dir: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(tensors by peft key, the file they came from): adapter_model.safetensors,
    or the older adapter_model.bin read weights-only (it never unpickles code).
    A file that cannot be read is a ConversionError naming it."""
    path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), path
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConversionError(f"{path} cannot be read as safetensors ({first_line(e)}): the file is damaged or "
                                  "not a safetensors file; write the adapter again with PeftModel.save_pretrained") \
                from None
    legacy = os.path.join(adapter_dir, LEGACY_WEIGHTS_FILE)
    if not os.path.isfile(legacy):
        raise ConversionError(f"{adapter_dir} holds no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}): the adapter's "
                              "weights are missing")
    try:
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{legacy} holds an object that loading with weights_only=True refuses "
                              f"({unpickling_reason(e)}): refusing to load it (an adapter file holds tensors only; "
                              "it was altered, or is not an adapter)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{legacy} cannot be loaded ({first_line(e)}): the file is truncated or corrupt") \
            from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ConversionError(f"{legacy} holds a {type(tensors).__name__}, not a dict of tensors by name: it is not "
                              "an adapter's weights")
    return tensors, legacy


def check_peft_weights(tensors: Dict[str, torch.Tensor], path: str, settings: AdapterSettings,
                       args: dict) -> None:
    """Every key the settings call for on every layer is in `tensors` with its
    shape for the base model `args`, and nothing else (peft only warns)."""
    shapes = settings.expected_shapes(args)
    expected = set()
    for index in range(args["num_layers"]):
        for module, tensor, _, key in layer_keys(settings, index):
            expected.add(key)
            if key not in tensors:
                raise ConversionError(f"{path}: missing key {key} (adapter_config.json asks for targets "
                                      f"{', '.join(settings.targets)}{' with DoRA' if settings.use_dora else ''} "
                                      f"on all {args['num_layers']} layers of the base model)")
            if tuple(tensors[key].shape) != shapes[(module, tensor)]:
                raise ConversionError(f"{path}: {key} has shape {list(tensors[key].shape)}, but with r={settings.rank} "
                                      f"(adapter_config.json) the base model needs {list(shapes[(module, tensor)])}: "
                                      "is it an adapter of this base model?")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConversionError(f"{path}: unexpected key {extra[0]}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f": adapter_config.json targets {', '.join(settings.targets)}"
                              f"{'' if settings.use_dora else ' without DoRA'} on layers 0-{args['num_layers'] - 1} "
                              "of the base model; fix the config or remove the key")


def to_megatron_names(tensors: Dict[str, torch.Tensor], settings: AdapterSettings,
                      layer: int) -> Dict[str, torch.Tensor]:
    """One layer's adapter tensors under our names (global index)."""
    return {ours: tensors[theirs] for _, _, ours, theirs in layer_keys(settings, layer)}
