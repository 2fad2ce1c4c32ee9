"""Federated averaging of peft LoRA adapters (FedAvg, as FinLoRA's FedLoRA runs it).

FinLoRA's federated LoRA (lora/flowertune-llm) is Flower's `FedAvg` strategy
over the arrays of `get_peft_model_state_dict(model)`, each client weighted by
its number of training examples (`len(trainset)`). So every tensor of the
adapter file is averaged on its own:

    lora_A   <- sum_k n_k A_k / sum_k n_k
    lora_B   <- sum_k n_k B_k / sum_k n_k
    lora_magnitude_vector (DoRA) <- sum_k n_k m_k / sum_k n_k

This is NOT the average of the clients' weight updates: the averaged adapter
applies (sum n_k B_k)(sum n_k A_k) / (sum n_k)^2, which differs from
sum n_k B_k A_k / sum n_k unless the clients' A (or B) agree. We reproduce the
method as FinLoRA defines it. Sums run in float64; the result takes the
inputs' dtype.

Adapters are averaged only when they are adapters of one base model with one
configuration: every adapter_config.json field must agree (except the ones in
IGNORED_FIELDS), and the tensors must have the same names, shapes and dtypes.
"""

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch

from megatron.training.checkpoint_convert.core import ConversionError
from megatron.training.checkpoint_convert.peft import (
    CONFIG_FILE, WEIGHTS_FILE, read_adapter_config, read_peft_weights,
)

# Fields that describe how an adapter was saved, not what it computes.
IGNORED_FIELDS = ("inference_mode", "peft_version", "revision")
SET_FIELDS = ("target_modules",)  # order does not matter (peft keeps a set)


def read_config(adapter_dir: str) -> dict:
    """A LoRA adapter's adapter_config.json, its values checked (peft.read_adapter_config)."""
    return read_adapter_config(adapter_dir, "each --adapters entry must be a peft adapter directory")[0]


def _comparable(config: dict) -> dict:
    out = {k: v for k, v in config.items() if k not in IGNORED_FIELDS}
    for key in SET_FIELDS:
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return out


def check_same_adapter(configs: Sequence[dict], dirs: Sequence[str]) -> None:
    """Raise ConversionError naming the first field on which an adapter's config differs from the first one's."""
    first = _comparable(configs[0])
    for config, path in zip(configs[1:], dirs[1:]):
        other = _comparable(config)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                what = "base model" if key == "base_model_name_or_path" else "configuration"
                raise ConversionError(
                    f"{path}/{CONFIG_FILE} has {key}={other.get(key)!r}, {dirs[0]}/{CONFIG_FILE} has "
                    f"{first.get(key)!r}: FedAvg averages adapters of one {what} only")


def fedavg(tensors: Sequence[Dict[str, torch.Tensor]], weights: Sequence[float],
           files: Sequence[str]) -> Dict[str, torch.Tensor]:
    """sum_k w_k T_k / sum_k w_k for every tensor name, in float64, cast back to the inputs' dtype."""
    names = set(tensors[0])
    for t, path in zip(tensors[1:], files[1:]):
        if set(t) != names:
            extra = sorted(set(t) ^ names)[0]
            raise ConversionError(f"{path} and {files[0]} hold different tensors ({extra} is in one only): "
                                  "FedAvg averages adapters of one configuration only")
    total = float(sum(weights))
    out = {}
    for name in sorted(names):
        first = tensors[0][name]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for t, w, path in zip(tensors, weights, files):
            if t[name].shape != first.shape or t[name].dtype != first.dtype:
                raise ConversionError(f"{path}: {name} is {list(t[name].shape)} {t[name].dtype}, in {files[0]} it is "
                                      f"{list(first.shape)} {first.dtype}: the adapters do not share a configuration")
            acc += float(w) * t[name].double()
        out[name] = (acc / total).to(first.dtype).contiguous()
    return out


def average_adapters(adapter_dirs: Sequence[str], num_examples: Sequence[int],
                     out_dir: str) -> Tuple[dict, List[float]]:
    """Write the FedAvg of the peft directories into `out_dir` (its adapter_config.json
    is the inputs' common one). Returns (config, each adapter's weight n_k / sum n)."""
    from safetensors.torch import save_file

    if len(adapter_dirs) < 2:
        raise ConversionError("give at least two adapter directories to average")
    if len(num_examples) != len(adapter_dirs):
        raise ConversionError(f"--num-examples has {len(num_examples)} values for {len(adapter_dirs)} adapters: "
                              "give each adapter's number of training examples, in the same order")
    if any(n <= 0 for n in num_examples):
        raise ConversionError(f"--num-examples {' '.join(map(str, num_examples))}: every count must be positive")
    configs = [read_config(d) for d in adapter_dirs]
    check_same_adapter(configs, adapter_dirs)
    loaded = [read_peft_weights(d) for d in adapter_dirs]
    averaged = fedavg([t for t, _ in loaded], num_examples, [f for _, f in loaded])
    total = sum(num_examples)
    provenance = {"fedavg": json.dumps([{"adapter": os.path.abspath(d), "num_examples": n}
                                        for d, n in zip(adapter_dirs, num_examples)])}
    save_file(averaged, os.path.join(out_dir, WEIGHTS_FILE), metadata=dict(provenance, format="pt"))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(configs[0], f, indent=2)
        f.write("\n")
    return configs[0], [n / total for n in num_examples]
