"""Hugging Face weight files, read lazily and written in shards.

`HFWeights` finds a tensor by name in model.safetensors, a sharded
model-XXXXX-of-YYYYY.safetensors set (model.safetensors.index.json), or the
older pytorch_model.bin (+ index) and reads only the tensors asked for: each
file is opened for the read and closed after it, so memory holds what was
asked for, not the file. `ShardedSafetensorsWriter` writes tensors in order
into shards of at most `max_shard_bytes` plus the index, as
`save_pretrained` does.
"""

import json
import os
from typing import Dict, Iterable, List, Optional

import torch

from megatron.training.checkpoint_convert.core import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class HFWeights:
    """Name -> tensor access to the weights of an HF model directory."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        self.file_of: Dict[str, str] = {}
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index = os.path.join(model_dir, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
                break
            if os.path.isfile(os.path.join(model_dir, single)):
                self.file_of = {name: single for name in self._names_in(single)}
                break
        else:
            raise ConversionError(
                f"{model_dir} holds no model weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or "
                f"{BIN_INDEX} (download the model's weight files too, not only its config)")
        for name in sorted(set(self.file_of.values())):
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise ConversionError(f"{os.path.join(model_dir, name)} is missing (listed in the weight index): "
                                      "the download is incomplete")

    def _names_in(self, file_name: str) -> List[str]:
        path = os.path.join(self.dir, file_name)
        if file_name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise ConversionError(f"{self.dir} lacks the weights {missing[:4]}: it is not a complete checkpoint of "
                                  "the architecture its config.json names")
        by_file: Dict[str, List[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for file_name, wanted in by_file.items():
            path = os.path.join(self.dir, file_name)
            if file_name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    out.update((n, f.get_tensor(n)) for n in wanted)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                out.update((n, state[n].clone()) for n in wanted)
                del state
        return out


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip():
            return int(float(t[: -len(unit)]) * factor)
    try:
        return int(t)
    except ValueError:
        raise ConversionError(f"cannot read the size {text!r}: write it like 5GB, 500MB or 2GiB")


class ShardedSafetensorsWriter:
    """Collect tensors in order; write a shard whenever `max_shard_bytes` would be exceeded."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.dir, self.max_bytes = out_dir, max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, tensors: Dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t.contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self._tmp_name(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, i: int) -> str:
        return os.path.join(self.dir, f"shard-{i:05d}.safetensors.tmp")

    def close(self) -> Optional[str]:
        """Write the last shard; name the shards (and the index when there are
        several) as transformers expects. Returns the index path or None."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self._tmp_name(0), os.path.join(self.dir, SAFE_SINGLE))
            return None
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(i), os.path.join(self.dir, final))
            weight_map.update((name, final) for name in names)
        index = os.path.join(self.dir, SAFE_INDEX)
        with open(index, "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
        return index
