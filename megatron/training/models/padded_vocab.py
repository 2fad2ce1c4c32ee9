"""Vocabulary padding rows are not words: their logits are excluded.

Megatron pads the embedding and output layer to a multiple of
--make-vocab-size-divisible-by x TP rows. The extra rows never occur as
targets, but a plain softmax over the output layer counts them, so the loss
would depend on how much padding a layout adds (a TP=1 checkpoint of a
257-token model continued at TP=2 goes from 384 to 512 rows and its loss
rises by log(512/384) = 0.29 nats at initialisation), and it would differ from
the loss of the same weights exported to Hugging Face (which has no padding).

`mask_padded_logits` sets the logits of ids >= the real vocabulary size to
-inf, out of place, so megatron-core's own vocab-parallel cross-entropy (and
any fused cross-entropy, which should call this function first) gives them
zero probability and zero gradient. Under tensor parallelism each rank holds
columns [rank x width, (rank + 1) x width) of the padded vocabulary; a rank
whose columns are all padding gets all -inf, which the cross-entropy's
all-reduced maximum handles (exp(-inf - max) = 0).

`exclude_padded_vocab(model, vocab_size)` applies it to every output of a
GPTModel's output layer (training loss, evaluation, inference logits,
generation), through a forward hook, so megatron-core's model and loss
function stay as they are.
"""

from typing import Optional

import torch


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, first_id: int = 0) -> torch.Tensor:
    """`logits` [..., width], whose last dimension holds token ids
    [first_id, first_id + width), with the columns of ids >= `vocab_size` set
    to -inf (a new tensor; differentiable: those columns get zero gradient).
    Returned unchanged when no column is padding."""
    width = logits.shape[-1]
    real = vocab_size - first_id  # columns of this slice that are real ids
    if real >= width:
        return logits
    keep = torch.arange(width, device=logits.device) < max(real, 0)
    return logits.masked_fill(~keep, float("-inf"))


def vocab_slice_start(width: int, padded_vocab_size: int, tp_rank: int) -> int:
    """The first token id of a logits slice `width` columns wide: 0 when it
    holds the whole padded vocabulary (gathered), else this TP rank's slice."""
    return 0 if width == padded_vocab_size else tp_rank * width


def exclude_padded_vocab(model, vocab_size: Optional[int], padded_vocab_size: int, tp_rank: int) -> None:
    """Mask the padding columns of every output of `model.output_layer`
    (a megatron-core GPTModel chunk; chunks without an output layer, or a
    vocabulary without padding, are left alone). `vocab_size` None: unknown
    (a checkpoint from before this was recorded), nothing is masked."""
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None or vocab_size is None or vocab_size >= padded_vocab_size:
        return

    def hook(module, inputs, output):
        logits, bias = output
        first = vocab_slice_start(logits.shape[-1], padded_vocab_size, tp_rank)
        return mask_padded_logits(logits, vocab_size, first), bias

    output_layer.register_forward_hook(hook)
