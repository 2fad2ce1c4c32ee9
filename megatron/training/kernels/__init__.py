"""Fused kernels for the pip GPU path (no Transformer Engine), all in one place.

    selection = configure(args)              # flags x capabilities -> a provider per kernel; call sites set
    transformer_config_fields(args)          # the fusion fields of megatron-core's TransformerConfig
    configure_optimizer(args, optimizer)     # torch's fused AdamW where megatron-core built torch's AdamW
    selection.describe()                     # the start-up line: the path each kernel takes

The kernels: vocab-parallel cross-entropy and SwiGLU on the fused [gate|up]
fc1 output (Liger's Triton kernels), RoPE on strided q/k views (rope.py, our
Triton kernel), gradient-accumulation fusion (grad_accum.py, torch.addmm
into the main grads) and torch's fused AdamW (adam.py). capabilities.py says
what can run here, selection.py which provider runs, hooks.py where each
plugs into megatron-core.
"""

from megatron.training.kernels.adam import set_fused_adamw
from megatron.training.kernels.capabilities import detect
from megatron.training.kernels.hooks import install
from megatron.training.kernels.selection import KernelSelection, select


def configure(args) -> KernelSelection:
    """Select the kernels for `args` (kept as args.kernel_selection) and set
    megatron-core's call sites to match. Idempotent."""
    caps = detect()
    selection = getattr(args, "kernel_selection", None) or select(args, caps)
    install(selection)
    args.kernel_selection = selection
    return selection


def transformer_config_fields(args) -> dict:
    return configure(args).transformer_config_fields(args.swiglu)


def configure_optimizer(args, optimizer) -> None:
    """torch's fused AdamW on, or off, as the selection says (a no-op where
    megatron-core built Transformer Engine's or apex's FusedAdam)."""
    set_fused_adamw(optimizer, configure(args).get("adam") == "torch")
