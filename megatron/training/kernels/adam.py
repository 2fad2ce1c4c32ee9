"""torch's AdamW with fused=True inside megatron-core's optimizer.

Without Transformer Engine or apex, megatron-core builds `torch.optim.AdamW`
with torch's default implementation (foreach on CUDA). `set_fused_adamw`
switches every torch Adam/AdamW inside a megatron optimizer (chained,
distributed or not) to torch's fused kernel, or back. torch keeps that
choice in each param group, and `load_state_dict` restores the saved groups'
choice; a post-load hook applies this run's choice again, so a resumed run
does what its own flags say.
"""

import torch


def _torch_adams(optimizer):
    """The torch Adam/AdamW instances inside a megatron-core optimizer."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def _apply(adam, fused: bool) -> None:
    for group in adam.param_groups:
        group["fused"] = fused
        group["foreach"] = False if fused else None
    if fused:
        # The fused step keeps its step counts as fp32 tensors on the parameters'
        # device; a state loaded from an unfused run has them as CPU scalars.
        for param, state in adam.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def set_fused_adamw(optimizer, fused: bool) -> int:
    """Use (or stop using) torch's fused AdamW in `optimizer`, now and after
    every state load. Returns how many torch optimizers it changed."""
    count = 0
    for adam in _torch_adams(optimizer):
        _apply(adam, fused)
        adam.register_load_state_dict_post_hook(lambda opt: _apply(opt, fused))
        count += 1
    return count
