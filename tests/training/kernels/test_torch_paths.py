"""The kernels made of plain torch operators (the CPU's defaults) against megatron-core's own paths:
RoPE as one autograd function (rope_torch.py) against `_apply_rotary_pos_emb_bshd`, and the
foreach gradient norm and scale (multi_tensor.py) against megatron-core's per-tensor fallbacks,
inside its real clip_grad_by_total_norm_fp32."""

import pytest
import torch

from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale
from megatron.training.kernels import multi_tensor
from megatron.training.kernels.rope_torch import apply_rotary_pos_emb
from tests.training.kernels.test_rope import forward_and_grad, fused_qkv, rotary_freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_torch_rope_is_megatron_cores_rotation_bit_for_bit(dtype, rotary_percent):
    # The same products and sums in the same order, cos/sin rounded to t's dtype as megatron-core
    # does: the outputs and the gradients of the fused projection are equal, not just close.
    torch.manual_seed(0)
    q, k, mixed = fused_qkv(seq=9, batch=2, groups=3, heads_per_group=3, head_dim=16, dtype=dtype)
    freqs = rotary_freqs(9, 16, rotary_percent=rotary_percent, factor=2.0)
    for t in (q, k):
        g = torch.randn(t.shape, dtype=dtype)
        out, grad = forward_and_grad(apply_rotary_pos_emb, t, freqs, mixed, g)
        ref, ref_grad = forward_and_grad(_apply_rotary_pos_emb_bshd, t, freqs, mixed, g)
        assert out.is_contiguous() and torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_torch_rope_recomputes_cos_sin_for_new_angles_and_keeps_them_for_the_same():
    torch.manual_seed(1)
    t = torch.randn(6, 1, 2, 8)
    freqs = rotary_freqs(6, 8)
    first = apply_rotary_pos_emb(t, freqs)
    torch.testing.assert_close(apply_rotary_pos_emb(t, freqs), first, rtol=0, atol=0)
    other = freqs * 0.5  # another angle tensor (e.g. another sequence length or interpolation factor)
    assert torch.equal(apply_rotary_pos_emb(t, other), _apply_rotary_pos_emb_bshd(t, other))
    freqs.mul_(0.5)  # changed in place: its version moves, the cached cos/sin are not reused
    assert torch.equal(apply_rotary_pos_emb(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))


def _grads(seed):
    torch.manual_seed(seed)
    return [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]


def test_foreach_norm_and_scale_match_megatron_cores_fallbacks():
    from megatron.training import cpu_backend

    cpu_backend.activate()  # megatron-core's fallback allocates its result with device="cuda"
    grads = _grads(0)
    ours, _ = multi_tensor.multi_tensor_l2norm(2048, None, [grads], False)
    ref, _ = local_multi_tensor_l2_norm(2048, None, [grads], False)
    # fp32 norms of the same tensors summed in another order: ~1e-7 relative.
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    same = _grads(0)
    multi_tensor.multi_tensor_scale(2048, None, [same, same], 0.25)  # in place, as clip_grads calls it
    for got, g in zip(same, _grads(0)):
        assert torch.equal(got, g * 0.25)
    src, dst, ref_dst = _grads(1), [torch.empty(5, 3), torch.empty(7), torch.empty(2, 2, 2)], _grads(2)
    multi_tensor.multi_tensor_scale(2048, None, [src, dst], 3.0)
    local_multi_tensor_scale(2048, None, [src, ref_dst], 3.0)
    assert all(torch.equal(a, b) for a, b in zip(dst, ref_dst))


def test_megatron_cores_clipping_reads_the_installed_foreach_functions(call_sites):
    from megatron.core.optimizer import clip_grads
    from megatron.training import cpu_backend

    cpu_backend.activate()
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(3)]
    for p, g in zip(params, _grads(3)):
        p.grad = g.clone()
    call_sites(grad_clip="foreach")
    assert clip_grads.l2_norm_impl is multi_tensor.multi_tensor_l2norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.multi_tensor_scale
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(3)])).item()
    storage = [p.grad.data_ptr() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, norm)
    assert [p.grad.data_ptr() for p in params] == storage  # scaled in place, no copies
    for p, g in zip(params, _grads(3)):
        torch.testing.assert_close(p.grad, g * (1.0 / (norm + 1e-6)), rtol=1e-6, atol=0)
    call_sites()
    assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_swiglu_is_megatron_cores_unfused_glu_bit_for_bit(dtype):
    from megatron.training.kernels.swiglu_torch import make_bias_swiglu_impl

    torch.manual_seed(2)
    y = torch.randn(5, 3, 2 * 24, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 3, 24, dtype=dtype)

    def unfused(x):  # megatron-core's glu (mlp.py) without clamping or offset
        gate, up = torch.chunk(x, 2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def original(*args):
        raise AssertionError("the plain case must not fall back")

    out = make_bias_swiglu_impl(original)(y, None)
    (grad,) = torch.autograd.grad(out, y, g)
    ref = unfused(y)
    (ref_grad,) = torch.autograd.grad(ref, y, g)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad) and grad.is_contiguous()
    called = []
    make_bias_swiglu_impl(lambda *a: called.append(a) or a[0])(y, torch.zeros(48, dtype=dtype))
    assert called  # a bias goes to megatron-core's own implementation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rmsnorm_is_torchs_forward_bit_for_bit_and_its_gradients_to_rounding(dtype):
    from megatron.training.kernels.rmsnorm_torch import rms_norm

    torch.manual_seed(3)
    # [s, b, h] as the layers' norms see it, and a non-contiguous [s, b, heads, d] view as the
    # per-head q/k norms (--qk-layernorm) see it.
    hidden = torch.randn(7, 3, 40, dtype=dtype)
    heads = torch.randn(7, 3, 4, 2 * 16, dtype=dtype)[..., :16]
    for x in (hidden, heads):
        x = x.requires_grad_()
        w = (1 + 0.1 * torch.randn(x.shape[-1])).to(dtype).requires_grad_()
        g = torch.randn(x.shape, dtype=dtype)
        out = rms_norm(x, (x.shape[-1],), w, 1e-5)
        ref = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-5)
        assert torch.equal(out, ref)  # the same operators in the same order (fp32 inside for bf16)
        grads = torch.autograd.grad(out, (x, w), g)
        ref_grads = torch.autograd.grad(ref, (x, w), g)
        for got, want in zip(grads, ref_grads):
            assert got.dtype == want.dtype and got.shape == want.shape
            # The closed-form backward against autograd's through torch's composite: fp32 rounding
            # (~1e-7 relative) apart; in bf16 both are computed in fp32 and rounded once.
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(got, want, **tol)
    # A LoRA run's frozen norm weight: only the input's gradient, the same as torch's.
    frozen = torch.nn.Parameter(1 + 0.1 * torch.randn(40), requires_grad=False)
    x = hidden.float().requires_grad_()
    g = torch.randn(x.shape)
    (dx,) = torch.autograd.grad(rms_norm(x, (40,), frozen, 1e-5), x, g)
    (ref_dx,) = torch.autograd.grad(torch.nn.functional.rms_norm(x, (40,), frozen, 1e-5), x, g)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)

def test_the_local_specs_rmsnorm_computes_through_the_installed_function(call_sites):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.kernels import rmsnorm_torch
    from megatron.training.models import norms

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    norm = norms.LocalNorm(config, 8, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and list(norm.state_dict()) == ["weight"]
    call_sites(rmsnorm="torch")
    assert norms.rms_norm is rmsnorm_torch.rms_norm
    x = torch.randn(3, 2, 8, requires_grad=True)
    assert norm(x).grad_fn.name().endswith("_RMSNormBackward")
    call_sites()
    assert norms.rms_norm is torch.nn.functional.rms_norm
    assert not norm(x).grad_fn.name().endswith("_RMSNormBackward")
