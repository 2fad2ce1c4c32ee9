"""SwiGLU on the fused [gate | up] fc1 output as one autograd function on torch operators,
where no SwiGLU kernel runs (a CPU). megatron-core's `bias_swiglu_impl` signature.

    out = bias_swiglu_impl(y, None)        # y: [..., 2f] -> silu(y[..., :f]) * y[..., f:]

megatron-core's unfused gated path (`glu` in mlp.py) is three autograd
nodes: chunk, silu and the product. They keep silu's output beside the
input, and the chunk's backward concatenates the two halves' gradients into
a new [..., 2f] tensor. Here only the input is kept (silu is recomputed in
backward, a cheap elementwise pass) and the two gradients are written
straight into the halves of one [..., 2f] tensor. The same operators in the
same order as the unfused path (aten's silu, silu_backward and products):
the outputs and gradients are bitwise the same.

A bias, fp8 input storage or activation offloading go to megatron-core's own
implementation, as Liger's module does.
"""

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        gate, up = torch.chunk(y, 2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        gate, up = torch.chunk(y, 2, dim=-1)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        d_gate, d_up = torch.chunk(dy, 2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dy


def make_bias_swiglu_impl(original):
    """megatron-core's bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input) on _SwiGLU."""

    def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
        if bias is not None or fp8_input_store or cpu_offload_input:
            return original(input, bias, fp8_input_store, cpu_offload_input)
        return _SwiGLU.apply(input)

    return bias_swiglu_impl
