"""Gradient norm and clipping over many tensors with torch's _foreach operators, where
neither Transformer Engine nor apex provides its multi-tensor kernels.

megatron-core's clip_grads.py then falls back to per-tensor loops
(megatron/core/utils.py): the norm takes torch.norm of each gradient, turns
the list into a tensor through Python floats (one device synchronisation
per tensor on a GPU) and the norm of that; the scale writes `dst.copy_(src *
scale)`, a new gradient-sized tensor and a copy for every parameter, even
where src is dst (always, in clip_grad_by_total_norm_fp32). The functions
here keep those signatures (apex's amp_C ones, called through
megatron-core's local multi_tensor_applier) and the maths:

    l2norm: ||[||g_1||, ..., ||g_n||]||  as a [1] fp32 tensor on the gradients' device
    scale:  dst = src * scale            (in place with _foreach_mul_ when src is dst)

hooks.py installs them at megatron-core's module-level names.
"""

from typing import List

import torch


def multi_tensor_l2norm(chunk_size: int, noop_flag, tensor_lists: List[List[torch.Tensor]], per_tensor: bool,
                        *args):
    (tensors,) = tensor_lists
    norms = torch._foreach_norm(tensors, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms).float(), 2.0).reshape(1)
    return total, (torch.stack(norms) if per_tensor else None)


def multi_tensor_scale(chunk_size: int, noop_flag, tensor_lists: List[List[torch.Tensor]], scale: float) -> None:
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, torch._foreach_mul(src, scale))
