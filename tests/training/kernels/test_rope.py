"""Our Triton RoPE kernel against megatron-core's unfused rotary embedding
(`_apply_rotary_pos_emb_bshd`), forward and backward: fp32 on CPU under
Triton's interpreter, bf16 on a GPU."""

import pytest
import torch

from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.training.kernels.rope import fused_apply_rotary_pos_emb

# fp32: the kernel and torch form the same products (with their own cos/sin)
# and add them in another order, ~1e-7 apart for values of order 1; a wrong
# channel, sign or position is an error of order 1.
FP32 = dict(rtol=1e-5, atol=1e-5)
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rotary_freqs(seq, head_dim, rotary_percent=1.0, factor=None, device="cpu"):
    """megatron-core's angles [seq, 1, 1, rotary dims]: positions / factor x inverse frequencies,
    each half repeated (RotaryEmbedding.get_emb, rotate-half layout)."""
    rope = RotaryEmbedding(head_dim, rotary_percent, seq_len_interpolation_factor=factor,
                           use_cpu_initialization=True)
    freqs = rope.get_freqs_non_repeated(seq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :].to(device)


def fused_qkv(seq, batch, groups, heads_per_group, head_dim, dtype=torch.float32, device="cpu"):
    """q, k (views of one fused projection, split as megatron-core's SelfAttention does) and the projection."""
    mixed = torch.randn(seq, batch, groups, (heads_per_group + 2) * head_dim, dtype=dtype, device=device,
                        requires_grad=True)
    q, k, _ = torch.split(mixed, [heads_per_group * head_dim, head_dim, head_dim], dim=3)
    return q.reshape(seq, batch, groups * heads_per_group, head_dim), k, mixed


def forward_and_grad(rotate, t, freqs, leaf, grad_out):
    out = rotate(t, freqs)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out, grad


def test_strided_key_view_with_partial_rotary_and_position_interpolation():
    torch.manual_seed(0)
    q, k, mixed = fused_qkv(seq=5, batch=3, groups=3, heads_per_group=2, head_dim=12)
    assert not k.is_contiguous()  # k is read through the fused projection's strides
    freqs = rotary_freqs(5, 12, rotary_percent=0.5, factor=4.0)  # 6 of 12 channels rotate; positions / 4
    for t in (q, k):
        g = torch.randn(t.shape)
        out, grad = forward_and_grad(fused_apply_rotary_pos_emb, t, freqs, mixed, g)
        ref, ref_grad = forward_and_grad(_apply_rotary_pos_emb_bshd, t, freqs, mixed, g)
        torch.testing.assert_close(out, ref, **FP32)
        torch.testing.assert_close(grad, ref_grad, **FP32)
        assert torch.equal(out[..., 6:], t[..., 6:])  # the channels past --rotary-percent pass through


def test_query_view_with_one_head_per_group_and_a_strided_gradient():
    torch.manual_seed(1)
    q, k, mixed = fused_qkv(seq=7, batch=2, groups=5, heads_per_group=1, head_dim=16)
    assert not q.is_contiguous()
    freqs = rotary_freqs(7, 16)
    g = torch.randn(2, 7, 5, 16).transpose(0, 1)  # the gradient arrives as a non-contiguous view too
    out, grad = forward_and_grad(fused_apply_rotary_pos_emb, q, freqs, mixed, g)
    ref, ref_grad = forward_and_grad(_apply_rotary_pos_emb_bshd, q, freqs, mixed, g)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)
    assert out.is_contiguous()


def test_angles_for_more_positions_than_tokens_use_the_first_ones():
    torch.manual_seed(2)
    t = torch.randn(5, 1, 3, 8)
    freqs = rotary_freqs(9, 8)
    torch.testing.assert_close(fused_apply_rotary_pos_emb(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs[:5]), **FP32)


def test_megatron_core_reaches_the_kernel_through_its_rope_fusion_call_site(call_sites):
    from megatron.core.transformer import TransformerConfig

    call_sites(rope="triton")
    assert rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb
    # Without Transformer Engine this config was refused ("apply_rope_fusion is not available").
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, apply_rope_fusion=True,
                               use_cpu_initialization=True)
    torch.manual_seed(3)
    t, freqs = torch.randn(4, 2, 4, 8), rotary_freqs(4, 8)
    torch.testing.assert_close(rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=_NoContextParallel()),
                               _apply_rotary_pos_emb_bshd(t, freqs), **FP32)


def test_interleaved_layout_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="rotate-half layout only: drop --rotary-interleaved or add --no-rope-fusion"):
        fused_apply_rotary_pos_emb(torch.zeros(2, 1, 1, 4), rotary_freqs(2, 4), interleaved=True)


class _NoContextParallel:
    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.gpu
@on_gpu
def test_bf16_on_gpu_rounds_once_from_the_fp32_result():
    # Llama-3-8B attention shapes at sequence 4096: GQA 32/8 heads of 128 channels.
    torch.manual_seed(0)
    q, k, mixed = fused_qkv(4096, 2, 8, 4, 128, dtype=torch.bfloat16, device="cuda")
    freqs = rotary_freqs(4096, 128, device="cuda")
    for t in (q, k):
        g = torch.randn(t.shape, dtype=torch.bfloat16, device="cuda")
        out, grad = forward_and_grad(fused_apply_rotary_pos_emb, t, freqs, t, g)
        t32 = t.detach().float().requires_grad_()
        ref, ref_grad = forward_and_grad(_apply_rotary_pos_emb_bshd, t32, freqs, t32, g.float())
        # The kernel computes in fp32 and rounds once to bf16: within half a bf16
        # unit (2^-8 relative) of the fp32 result on the same bf16 inputs.
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad, rtol=2 ** -8, atol=1e-5)
        # megatron-core's unfused bf16 path rounds after every operation: bf16's usual tolerance.
        torch.testing.assert_close(out, _apply_rotary_pos_emb_bshd(t.detach(), freqs), rtol=1.6e-2, atol=1e-2)
