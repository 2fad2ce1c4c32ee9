"""Rotary position embedding as one autograd function on torch operators, where no RoPE kernel runs (a CPU).

    out = apply_rotary_pos_emb(t, freqs)     # t: [s, b, h, d], any strides; freqs: [s', 1, 1, r], s' >= s

The signature and maths of rope.py's Triton kernel, itself megatron-core's
unfused rotate-half rotation (`_apply_rotary_pos_emb_bshd`): with x1, x2 the
halves of the first r channels and f1, f2 the matching halves of `freqs`,

    out[:r/2] = x1 cos f1 - x2 sin f1,   out[r/2:r] = x2 cos f2 + x1 sin f2,   out[r:] = x[r:]

What megatron-core's unfused path spends and this one does not:
- cos and sin of the angles for every layer, for q and again for k: here
  once per angle tensor (megatron-core's RotaryEmbedding hands every layer
  the same one), kept for the next call;
- slicing off the pass-through channels and concatenating them back, whose
  backward zero-fills a full-size gradient and copies into it, and the
  concatenation that builds rotate_half(x);
- the activations autograd saves for those products: the backward is the
  rotation by -f (the transpose), so only cos and sin are kept.
Rounding as megatron-core's unfused path: cos and sin in fp32 rounded to t's
dtype, products and sums in t's dtype (bitwise the same forward in fp32).
"""

import torch

# The last angle tensor seen, its version, the dtype asked for, and its (cos, sin).
_last = [None, -1, None, None, None]


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype):
    if _last[0] is not freqs or _last[1] != freqs._version or _last[2] != dtype:
        _last[:] = freqs, freqs._version, dtype, torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    return _last[3], _last[4]


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The rotation by f (by -f with `transpose`, the backward) of the first r channels of t."""
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    x1, x2 = t[..., :half], t[..., half:rot_dim]
    o1, o2 = out[..., :half], out[..., half:rot_dim]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if transpose:  # d x1 = g1 cos f1 + g2 sin f2, d x2 = g2 cos f2 - g1 sin f1
        o1.add_(x2 * s2)
        o2.sub_(x1 * s1)
    else:
        o1.sub_(x2 * s1)
        o2.add_(x1 * s2)
    if rot_dim < t.shape[-1]:  # --rotary-percent < 1: the last channels pass through
        out[..., rot_dim:].copy_(t[..., rot_dim:])
    return out


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, transpose=True), None, None


def check_rope_inputs(t: torch.Tensor, freqs: torch.Tensor, path: str, name: str, interleaved: bool) -> None:
    """What the RoPE paths of this package take (this one and kernels/rope.py's Triton kernel): the
    rotate-half layout, t [s, b, h, d] and freqs [s' >= s, 1, 1, r] with r even and <= d."""
    if interleaved:
        raise ValueError(f"{path} implements the rotate-half layout only: "
                         "drop --rotary-interleaved or add --no-rope-fusion")
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"{name}: expected t [s, b, h, d] and freqs [s, 1, 1, r], got {tuple(t.shape)} "
                         f"and {tuple(freqs.shape)}")
    rot_dim = freqs.shape[-1]
    if rot_dim % 2 or rot_dim > t.shape[-1] or freqs.shape[0] < t.shape[0]:
        raise ValueError(f"{name}: freqs {tuple(freqs.shape)} do not fit t {tuple(t.shape)} "
                         "(need an even rotary width <= head dim and at least as many positions)")


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                         interleaved: bool = False) -> torch.Tensor:
    """RoPE on t [s, b, h, d] (sbhd, any strides) with freqs [s', 1, 1, r] (fp32
    angles, s' >= s, r even and <= d). Returns a new contiguous tensor."""
    check_rope_inputs(t, freqs, "the torch RoPE path", "RoPE", interleaved)
    cos, sin = _cos_sin(freqs, t.dtype)
    seq = t.shape[0]
    return _RotaryEmbedding.apply(t, cos[:seq], sin[:seq])
