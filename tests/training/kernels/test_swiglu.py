"""SwiGLU on megatron-core's fused [gate | up] fc1 output through Liger's Triton
kernel, as megatron-core's MLP reaches it (its bias_swiglu_impl call site),
against megatron-core's unfused gated path: fp32 on CPU under Triton's
interpreter, bf16 on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer import mlp

# fp32: the same silu(gate) * up (and its derivative) in another order of
# operations, ~1e-7 apart; a swapped half or a wrong derivative is off by O(1).
FP32 = dict(rtol=1e-5, atol=1e-5)
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def unfused_glu(x):
    """megatron-core's MLP without bias_activation_fusion: silu(first half) * second half."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def forward_and_grad(fn, x, grad_out):
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad_out)
    return out, x.grad


@pytest.mark.parametrize("shape", [(5, 3, 2 * 13), (7, 2 * 24)])  # MLP's [s, b, 2 ffn] and a 2-D [tokens, 2 ffn]
def test_liger_kernel_at_megatron_cores_call_site_matches_the_unfused_glu(call_sites, shape):
    call_sites(swiglu="liger")
    fused = mlp.bias_swiglu_impl
    assert fused is not fused_bias_swiglu.bias_swiglu_impl
    torch.manual_seed(0)
    x, g = torch.randn(shape) * 3, torch.randn(*shape[:-1], shape[-1] // 2)
    out, grad = forward_and_grad(lambda t: fused(t, None, False, False), x, g)
    ref, ref_grad = forward_and_grad(unfused_glu, x, g)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


def test_a_bias_goes_to_megatron_cores_own_function(call_sites):
    # Liger's kernel has no bias term (nor fp8 input storage): those calls go to
    # megatron-core's function, which the call site held before. (Not called here:
    # its torch.compile'd helpers take ~20 s to compile on a CPU.)
    call_sites(swiglu="liger")
    assert mlp.bias_swiglu_impl.fallback_impl is fused_bias_swiglu.bias_swiglu_impl


def test_off_restores_megatron_cores_function(call_sites):
    call_sites(swiglu="liger")
    call_sites()
    assert mlp.bias_swiglu_impl is fused_bias_swiglu.bias_swiglu_impl


@pytest.mark.gpu
@on_gpu
def test_bf16_on_gpu_rounds_like_the_unfused_path(call_sites):
    # Llama-3-8B's MLP at 8192 tokens: ffn 14336.
    call_sites(swiglu="liger")
    torch.manual_seed(0)
    x = torch.randn(4096, 2, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(4096, 2, 14336, dtype=torch.bfloat16, device="cuda")
    out, grad = forward_and_grad(lambda t: mlp.bias_swiglu_impl(t, None, False, False), x, g)
    ref, ref_grad = forward_and_grad(unfused_glu, x.float(), g.float())
    # Forward: silu rounded to bf16, then the product rounded (as the unfused bf16 path
    # does): two roundings, within one bf16 unit (2^-7 relative) of fp32 on the same inputs.
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-5)
    # Backward: computed in fp32 and rounded once: half a unit.
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(out, unfused_glu(x), rtol=2 ** -7, atol=1e-5)
