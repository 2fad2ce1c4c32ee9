"""Rotary position embedding as one Triton kernel, for megatron-core's [s, b, h, d] q and k.

    out = fused_apply_rotary_pos_emb(t, freqs)     # t: [s, b, h, d], any strides; freqs: [s', 1, 1, r], s' >= s

The same maths as megatron-core's unfused `_apply_rotary_pos_emb_bshd`
(rotate-half layout): with x1, x2 the two halves of the first r channels and
f1, f2 the matching halves of `freqs`,

    out[:r/2]  = x1 cos f1 - x2 sin f1,   out[r/2:r] = x2 cos f2 + x1 sin f2,   out[r:] = x[r:]

so --rotary-percent (r < d: the last channels pass through) and position
interpolation (the factor is already in `freqs`, which megatron-core's
RotaryEmbedding divides by it) need nothing more. Computed in fp32, rounded
once to t's dtype. The backward pass is the same rotation by -f.

q and k arrive as strided views of the fused QKV projection (k always is one;
q is when each query group holds one head): the kernel reads through the
view's strides, so no copy is made, and writes a new contiguous tensor.
The signature is Transformer Engine's `fused_apply_rotary_pos_emb`, whose
symbol megatron-core's rope_utils reads at call time (hooks.py puts this one
there).
"""

import torch
import triton
import triton.language as tl

from megatron.training.kernels.rope_torch import check_rope_inputs

# Elements of one (heads x half-channels) tile a program holds at once.
_TILE = 2048


@triton.jit
def _rope_kernel(x_ptr, out_ptr, freqs_ptr,
                 stride_xs, stride_xb, stride_xh, stride_xd,
                 stride_os, stride_ob, stride_oh,
                 stride_fs, stride_fd,
                 n_heads, half, rot_dim, n_pass,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr):
    # One program per (sequence position, batch entry); it loops over the heads.
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < half
    f_row = freqs_ptr + s * stride_fs
    f1 = tl.load(f_row + cols * stride_fd, mask=col_ok, other=0.0).to(tl.float32)
    f2 = tl.load(f_row + (cols + half) * stride_fd, mask=col_ok, other=0.0).to(tl.float32)
    cos1 = tl.cos(f1)[None, :]
    sin1 = tl.sin(f1)[None, :]
    cos2 = tl.cos(f2)[None, :]
    sin2 = tl.sin(f2)[None, :]
    x_row = x_ptr + s * stride_xs + b * stride_xb
    o_row = out_ptr + s * stride_os + b * stride_ob
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        ok = (heads < n_heads)[:, None] & col_ok[None, :]
        x_at = x_row + heads[:, None] * stride_xh
        o_at = o_row + heads[:, None] * stride_oh
        x1 = tl.load(x_at + cols[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + (cols[None, :] + half) * stride_xd, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            # The transpose of the rotation: d x1 = g1 cos f1 + g2 sin f2, d x2 = g2 cos f2 - g1 sin f1.
            o1 = x1 * cos1 + x2 * sin2
            o2 = x2 * cos2 - x1 * sin1
        else:
            o1 = x1 * cos1 - x2 * sin1
            o2 = x2 * cos2 + x1 * sin2
        tl.store(o_at + cols[None, :], o1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(o_at + half + cols[None, :], o2.to(out_ptr.dtype.element_ty), mask=ok)
        if BLOCK_PASS > 0:
            # Channels past the rotary ones (--rotary-percent < 1) pass through, forward and backward.
            pcols = tl.arange(0, BLOCK_PASS)
            p_ok = (heads < n_heads)[:, None] & (pcols < n_pass)[None, :]
            xp = tl.load(x_at + (rot_dim + pcols[None, :]) * stride_xd, mask=p_ok, other=0.0)
            tl.store(o_at + rot_dim + pcols[None, :], xp, mask=p_ok)


def _rotate(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    seq, batch, heads, dim = t.shape
    rot_dim = freqs.shape[-1]
    half = rot_dim // 2
    out = torch.empty((seq, batch, heads, dim), dtype=t.dtype, device=t.device)
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, _TILE // block_half))
    n_pass = dim - rot_dim
    _rope_kernel[(seq, batch)](
        t, out, freqs,
        t.stride(0), t.stride(1), t.stride(2), t.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        freqs.stride(0), freqs.stride(3),
        heads, half, rot_dim, n_pass,
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(n_pass) if n_pass else 0,
    )
    return out


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _rotate(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return _rotate(grad, freqs, backward=True), None


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> torch.Tensor:
    """RoPE on t [s, b, h, d] (sbhd, any strides) with freqs [s', 1, 1, r] (fp32
    angles, s' >= s, r even and <= d). Returns a new contiguous tensor."""
    check_rope_inputs(t, freqs, "the Triton RoPE kernel", "RoPE kernel", interleaved)
    return _RotaryEmbedding.apply(t, freqs)
