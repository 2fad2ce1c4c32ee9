"""RMSNorm over the last dimension as one autograd function on torch operators,
where no norm kernel runs (a CPU). `torch.nn.functional.rms_norm`'s signature.

    y = rms_norm(x, (h,), weight, eps)        # x * rsqrt(mean(x^2) + eps) * weight

On a CPU, torch's RMSNorm is a composite: about six elementwise passes
forward, each with its own output kept for backward, and about a dozen more
in autograd's backward of them. Here the forward is the same operators in
the same order (its output is bitwise torch's) and keeps only the input and
the per-row rstd; the backward is the closed form, four elementwise passes
and two matrix-vector products over g * x:

    t = g * x
    dw = t^T rstd                               # sum over rows of g * x * rstd
    dx = rstd * (g * w - x * rstd^2 * (t w) / h)

fp16/bf16 inputs are computed in fp32 and rounded once at the end, as torch's
composite does. Other shapes (a multi-dimensional normalized_shape, no weight) go to
torch's function, and so does a call without gradients (evaluation, generation): the same
forward.
"""

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)  # computed in fp32, as torch's composite does


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xf = x2.float() if x2.dtype in _HALF else x2
        rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        y = torch.mul(xf, rstd).mul_(weight.to(xf.dtype)).to(torch.promote_types(x.dtype, weight.dtype))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        xf, g, w = (a.reshape(-1, width).to(rstd.dtype) for a in (x, grad, weight))
        t = g * xf
        dx = dw = None
        if ctx.needs_input_grad[0]:
            coeff = torch.mv(t, w.view(-1)).view(-1, 1).mul_(rstd.square()).div_(-width)
            dx = torch.mul(g, w).addcmul_(xf, coeff).mul_(rstd).to(x.dtype).view(grad.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.mv(t.t(), rstd.view(-1)).to(weight.dtype)
        return dx, dw, None


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if (weight is None or len(normalized_shape) != 1 or not torch.is_grad_enabled()
            or not (input.requires_grad or weight.requires_grad)):
        return F.rms_norm(input, normalized_shape, weight, eps)  # nothing to keep for backward
    if eps is None:  # torch's default: the epsilon of the dtype it computes in
        eps = torch.finfo(torch.float32 if input.dtype in _HALF else input.dtype).eps
    return _RMSNorm.apply(input, weight, eps)
