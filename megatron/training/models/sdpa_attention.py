"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

A drop-in for megatron-core's `DotProductAttention` (same constructor and
forward signature, same [seq, batch, heads, head_dim] layout): the local
layer spec's core attention unless --attention-backend asks for the unfused
path (models/attention_backend.py). On GPU, SDPA dispatches to FlashAttention
/ memory-efficient / cuDNN kernels; on CPU it runs its fused flash kernel.

Masks, as megatron-core's unfused softmax reads them (True = masked):
- none with a causal layer (pretraining, padded SFT): the kernel masks
  (`is_causal=True`), so no [s, s] mask is materialised;
- [b, 1, s, s] (packed sequences: block-diagonal causal; causal + padding),
  [b, 1, 1, s] (BERT's key padding): inverted once per batch, not per layer.
A query row with every key masked gives 0 here where megatron-core's
softmax (scores filled with -10000) gives the mean of V: such rows are
padding, whose outputs reach no loss.
Grouped-query attention: SDPA's `enable_gqa` reads each K/V group for its
query heads without copying them; with a mask on CUDA only the math kernel
would take it, so K and V are expanded there instead (as transformers does).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use Transformer Engine")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"SDPAttention supports causal, padding and no-mask attention, not {attn_mask_type}")
        tp_size = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.attn_mask_type = attn_mask_type
        self.layer_number = max(1, layer_number)
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if causal or attention_mask is None else _allowed(attention_mask)
        groups = self.heads_per_partition // self.groups_per_partition
        gqa = {}
        if groups > 1:
            if mask is None or not q.is_cuda:
                gqa["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale, **gqa)
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)


# The last mask seen, its version and its inverse: every layer of a forward pass gets the same mask tensor.
_last_mask = [None, -1, None]


def _allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask (True = attend) from megatron-core's (True = masked), computed once per mask."""
    if _last_mask[0] is not attention_mask or _last_mask[1] != attention_mask._version:
        _last_mask[:] = attention_mask, attention_mask._version, ~attention_mask
    return _last_mask[2]


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
