"""Put adapters on a model: the hook `training.build_model` calls after the
model provider and before Float16Module / DDP.

    apply_adapters(args, config, chunks)   freeze the base, attach adapters, print the trainable share
    init_magnitudes(chunks)                DoRA's m = ||W + s B A||_row, once the base weights are in
    adapters_disabled(chunks)              a context in which the chunks compute the frozen base alone

The base parameters get requires_grad=False, so megatron-core's DDP buffers
and optimizer (distributed or not) hold the adapter parameters only, and its
frozen-weight linear path (LinearWithFrozenWeight) saves no input and
computes no weight gradient. Adapters start from FULL tensors drawn with a
generator seeded from --seed, the global layer index and the module, then
sliced to this rank's shard: every TP/PP layout starts from the same adapter.
"""

import contextlib
import math
import re
from typing import Iterator, List, Tuple

import torch
from torch import nn

from megatron.training.peft.arguments import describe
from megatron.training.peft.layers import ADAPTERS, ParallelAdapter
from megatron.training.peft.quantized import QuantizedLinear
from megatron.training.peft.targets import MODULES, TARGETS, LayerDims, modules_to_adapt

_LAYER_MODULE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def scaling(args) -> float:
    """peft's scale: alpha / r, or alpha / sqrt(r) for RSLoRA."""
    return args.lora_alpha / (math.sqrt(args.lora_rank) if args.lora_use_rslora else args.lora_rank)


def adapted_modules(chunk: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, linear) of every linear in `chunk` that carries an adapter."""
    for name, module in chunk.named_modules():
        if isinstance(getattr(module, "adapter", None), ParallelAdapter):
            yield name, module


def _add_adapter_output(module: nn.Module, inputs, output):
    if module.adapter.disabled:
        return output
    return module.adapter(inputs[0], output, module)


@contextlib.contextmanager
def adapters_disabled(chunks: List[nn.Module]):
    """Within the block the chunks compute their frozen base alone (peft's
    `disable_adapter()`): the reference model of preference tuning, with no
    second copy of the weights."""
    adapters = [module.adapter for chunk in chunks for _, module in adapted_modules(chunk)]
    for adapter in adapters:
        adapter.disabled = True
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.disabled = False


def _require_grad(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # Full recomputation (megatron-core's CheckpointFunction) only back-propagates into a layer block whose
    # input requires grad; with a frozen embedding the first block's input would not, and its adapters
    # would get no gradient at all. Inert without grad (evaluation; inference tensors refuse requires_grad).
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_(True)
    return output


def _global_layer(chunk: nn.Module, local_index: int) -> int:
    return chunk.decoder.layers[local_index].layer_number - 1


def _full_a(args, layer: int, name: str, in_features: int) -> torch.Tensor:
    """peft's initial lora_A for HF module `name` of global layer `layer`: the
    full [r, in_features] tensor, kaiming-uniform (a = sqrt(5)) from its own generator."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + layer * len(TARGETS) + list(TARGETS).index(name))
    full = torch.empty(args.lora_rank, in_features)
    return nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)


def apply_adapters(args, config, chunks: List[nn.Module]) -> None:
    """Freeze every parameter of the model chunks and attach the adapters the flags name."""
    from megatron.core import parallel_state

    dims = LayerDims.from_config(config)
    tp, tp_rank = args.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_rank()
    per_module = modules_to_adapt(args.lora_target_modules)
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        for name, module in list(chunk.named_modules()):
            match = _LAYER_MODULE.match(name)
            if match is None or match.group(2) not in per_module:
                continue
            suffix = match.group(2)
            adapter = ADAPTERS[MODULES[suffix]](
                suffix, per_module[suffix], dims, args.lora_rank, scaling(args), args.lora_dropout,
                args.lora_use_dora, config.sequence_parallel and tp > 1, tp, config.params_dtype)
            layer = _global_layer(chunk, int(match.group(1)))
            with torch.no_grad():
                for hf_name in adapter.targeted:
                    weights = adapter.sub(hf_name)
                    full = _full_a(args, layer, hf_name, dims.hf_shape(hf_name)[1])
                    weights.lora_A.weight.copy_(adapter.shard_of_full_a(hf_name, full, tp_rank))
                    weights.lora_B.weight.zero_()
            module.add_module("adapter", adapter)
            module.register_forward_hook(_add_adapter_output)
        if args.recompute_granularity == "full" and getattr(chunk, "pre_process", False):
            chunk.embedding.register_forward_hook(_require_grad)
    trainable, total = parameter_counts(chunks)
    if torch.distributed.get_rank() == 0:
        print(f"> {describe(args)} on {','.join(args.lora_target_modules)}: {trainable / 1e6:.2f}M trainable of "
              f"{total / 1e6:.1f}M ({100.0 * trainable / max(total, 1):.2f}%)", flush=True)


@torch.no_grad()
def init_magnitudes(chunks: List[nn.Module]) -> None:
    """DoRA: set each magnitude vector to the current ||W + s B A||_row (peft's
    initialisation, ||W||_row while B is zero). Collective over TP."""
    for chunk in chunks:
        for _, module in adapted_modules(chunk):
            adapter = module.adapter
            if adapter.dora:
                for name, norm in adapter.weight_norms(module).items():
                    adapter.sub(name).lora_magnitude_vector.copy_(norm)


def parameter_counts(chunks: List[nn.Module]) -> Tuple[int, int]:
    """(trainable, total) parameters of the whole model, over all TP and PP
    ranks (replicated tensors counted once; a QLoRA base counts its weights'
    elements). Collective over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    trainable = total = 0
    for chunk in chunks:
        for param in chunk.parameters():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                total += param.numel()
                trainable += param.numel() if param.requires_grad else 0
        total += sum(m.num_base_elements for m in chunk.modules() if isinstance(m, QuantizedLinear))
    counts = torch.tensor([trainable, total], dtype=torch.float64)
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts[0]), int(counts[1])
