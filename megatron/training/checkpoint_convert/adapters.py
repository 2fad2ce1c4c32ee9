"""Conversion sources and targets for LoRA adapters (the Llama-architecture decoder families).

- `PeftSource`: a peft adapter directory over a base model (ours or HF),
  checked key by key against the base; its layers are the adapter tensors
  under our names, so the megatron saver writes an adapter-only checkpoint
  that continues training (`--loader peft --saver megatron`).
- `save_peft`: an adapter source (an adapter-only checkpoint, or a peft
  directory) -> a peft directory (`--saver peft`).
- `MergedSource`: base + adapters as one plain model, merged as peft's
  `merge_and_unload()` does, in fp32 (`--saver hf` on an adapter source; the
  saver casts to the base's dtype afterwards). A QLoRA adapter is merged
  into the base as its training saw it: quantized and dequantized.
"""

import os
from typing import Dict, Optional

import torch

from megatron.training.checkpoint_convert import peft
from megatron.training.checkpoint_convert.core import ConversionError, ModelSource, progress
from megatron.training.checkpoint_convert.llama import hf_layer, megatron_layer

TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the flag the adapter run trained with


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 magnitude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The merged [out, in] weight in fp32, as peft merges one linear layer:
    LoRA W + s (B @ A); DoRA m / ||W + s (B @ A)||_row * (W + s (B @ A)),
    the norm over each output row."""
    merged = weight.float() + (lora_b.float() @ lora_a.float()) * scaling
    if magnitude is None:
        return merged
    norm = torch.linalg.norm(merged, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * merged


def dequantized_as_trained(weight: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """One HF weight matrix as QLoRA training used it (peft/quantized.py): in the training
    dtype, quantized whole by bitsandbytes (NF4, block 64, no double quantisation; or int8 per
    row of the fp16 weight) and dequantized, in `dtype`. NF4 is dequantized by its format:
    blocks of 64 consecutive elements of the flattened matrix (bitsandbytes' CUDA and reference
    kernels; its CPU kernel in 0.50.2 mis-blocks rows whose width is not a multiple of 64)."""
    import bitsandbytes.functional as bnb

    weight = weight.to(dtype).contiguous()
    if bits == 4:
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        flat = packed.reshape(-1)
        codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[: weight.numel()].long()
        values = bnb.get_4bit_type("nf4", device=weight.device)[codes]
        absmax = state.absmax.float().repeat_interleave(64)[: weight.numel()]
        return (values * absmax).view(weight.shape).to(dtype)
    codes, absmax, _ = bnb.int8_vectorwise_quant(weight.to(torch.float16))
    return bnb.int8_vectorwise_dequant(codes, absmax).to(dtype)


class PeftSource(ModelSource):
    """A peft LoRA directory applied to `base` (a ModelSource without adapters)."""

    format = "peft"

    def __init__(self, adapter_dir: str, base: ModelSource):
        if base.adapter is not None:
            raise ConversionError(f"--base-load-dir {base.path} is itself an adapter checkpoint: give the base model "
                                  f"it was trained on ({(base.adapter_base or {}).get('load')})")
        self.path = os.path.abspath(adapter_dir)
        self.adapter, self.config = peft.read_peft_config(self.path)
        self.tensors, weights_file = peft.read_peft_weights(self.path)
        peft.check_peft_weights(self.tensors, weights_file, self.adapter, base.args)
        self._base = base
        self.args = dict(base.args, **self.adapter.to_args())
        self.vocab_size = base.vocab_size
        self.iteration = None
        if base.format == "megatron":
            self.adapter_base = {"load": base.path, "iteration": base.iteration or 0}

    def embedding(self):
        return {}

    def layer(self, index):
        return peft.to_megatron_names(self.tensors, self.adapter, index)

    def final(self):
        return {}

    def base(self):
        return self._base


def open_peft_source(adapter_dir: str, base_dir: Optional[str], tokenizer_model: Optional[str] = None) -> PeftSource:
    """`--loader peft`: the adapter at `adapter_dir` over the base model at `base_dir`
    (this project's checkpoint, or an HF directory)."""
    if not base_dir:
        raise ConversionError("--loader peft needs --base-load-dir: the base model the adapter was trained on (this "
                              "project's checkpoint to continue training it, or a Hugging Face directory)")
    return PeftSource(adapter_dir, open_source(base_dir, tokenizer_model))


def open_source(path: str, tokenizer_model: Optional[str] = None) -> ModelSource:
    """A model directory as a source: an HF directory (config.json) or one of this project's checkpoints."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from megatron.training.checkpoint_convert.llama import LlamaHFSource

        return LlamaHFSource(path, tokenizer_model)
    from megatron.training.checkpoint_convert.megatron_checkpoint import open_checkpoint

    return open_checkpoint(path, tokenizer_model)  # either checkpoint format


def save_peft(source: ModelSource, out_dir: str, base_model_name_or_path: Optional[str] = None,
              dtype: Optional[torch.dtype] = None) -> dict:
    """Write the adapters of `source` as a peft directory; returns adapter_config.json's content.
    When `base_model_name_or_path` is a local directory, its tokenizer files are copied beside the
    adapter byte for byte, as trl's and transformers' trainers save the tokenizer with an adapter (not
    its config.json: transformers takes a directory holding config.json for a whole model, and would
    look for the base's weights there instead of at base_model_name_or_path)."""
    if source.adapter is None:
        raise ConversionError(f"{source.path} holds no LoRA adapters (its args have no lora_rank): --saver peft "
                              "exports adapter checkpoints, written by training with --lora-rank")
    bar = progress(source.num_layers, "writing peft adapter")

    def layers():
        for i in range(source.num_layers):
            yield source.layer(i)
            bar.update(1)

    try:
        config = peft.write_peft_dir(out_dir, source.adapter, layers(), source.num_layers, base_model_name_or_path,
                                     dtype)
    finally:
        bar.close()
    if base_model_name_or_path and os.path.isdir(base_model_name_or_path):
        from megatron.training.checkpoint_convert.hf_tokenizer import copy_tokenizer_files

        copy_tokenizer_files(base_model_name_or_path, out_dir)
    return config


class MergedSource(ModelSource):
    """The base model of an adapter source with its adapters merged in (fp32 merged weights)."""

    def __init__(self, adapters: ModelSource):
        self.adapters, self.settings = adapters, adapters.adapter
        self._base = adapters.base()
        # --verify runs the adapter side (base + adapters), which computes what this merged model does.
        self.format, self.path = adapters.format, adapters.path
        self.args = dict(self._base.args)
        self.vocab_size = self._base.vocab_size

    def embedding(self):
        return self._base.embedding()

    def final(self):
        return self._base.final()

    def layer(self, index):
        hf = hf_layer(self._base.layer(index), index, self.args)
        if self.settings.quant_bits:  # QLoRA trained on the quantized base: merge into what it saw
            dtype = TRAINING_DTYPES.get(next((k for k in TRAINING_DTYPES if self.adapters.args.get(k)), None),
                                        torch.float32)
            for module in peft.HF_PATHS.values():
                key = f"model.layers.{index}.{module}.weight"
                hf[key] = dequantized_as_trained(hf[key], self.settings.quant_bits, dtype)
        adapter = self.adapters.layer(index)
        for module in self.settings.targets:
            key = f"model.layers.{index}.{peft.HF_PATHS[module]}.weight"
            parts: Dict[str, torch.Tensor] = {t: adapter[peft.megatron_key(index, module, t)]
                                              for t in self.settings.tensor_names}
            hf[key] = merge_weight(hf[key], parts["lora_A.weight"], parts["lora_B.weight"], self.settings.scaling,
                                   parts.get(peft.DORA_TENSOR))
        return megatron_layer(hf, index, self.args)
