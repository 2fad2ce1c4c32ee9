"""Vocabulary padding rows are excluded from the softmax (issue #15, finding 8):
the loss does not depend on how much a layout pads, and a converted Hugging
Face model's loss is transformers' own."""

import os

import torch

from megatron.training.checkpoint.save_load import read_checkpoint_args
from tests.distributed.launcher import run_distributed
from tests.training.pretrain_runner import SCHEDULE, TINY_LLAMA, run_pretrain_sequence


def _masked_vocab_parallel_loss(cases, rank, world_size):
    """megatron-core's vocab-parallel cross-entropy on this TP rank's slice of
    padded logits, masked; (loss, gradient of this rank's slice) per case.
    Needs megatron-core's parallel state at TP = world_size."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron.training.models.padded_vocab import mask_padded_logits, vocab_slice_start

    out = []
    for full, target, vocab in cases:
        width = full.shape[-1] // world_size
        piece = full[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
        masked = mask_padded_logits(piece, vocab, vocab_slice_start(width, full.shape[-1], rank))
        loss = vocab_parallel_cross_entropy(masked, target)
        loss.sum().backward()
        out.append((loss.detach(), piece.grad))
    return out


# 257 ids padded to a multiple of 128 x TP: 384 rows at TP=1, 512 at TP=2.
VOCAB_257 = ["--mock-data", "--vocab-size", "257", "--make-vocab-size-divisible-by", "128", "--split", "98,1,1",
             "--micro-batch-size", "2", "--global-batch-size", "4"]


def test_loss_does_not_move_when_tp_changes_the_padding(tmp_path):
    """The issue's case: the same weights continued at TP=1 and at TP=2 give
    the same first loss (it rose by log(512/384) = 0.29 nats before). The two
    layouts differ only in the order of fp32 reductions: 1e-5. (TP=1 runs
    on 2 processes as 2 data-parallel replicas: the same 4 samples.)"""
    ckpt = str(tmp_path / "ckpt")
    argv = TINY_LLAMA + SCHEDULE + VOCAB_257
    go_on = ["--load", ckpt, "--finetune", "--train-iters", "1", "--lr-warmup-iters", "0"]
    _, tp1, tp2 = run_pretrain_sequence([argv + ["--train-iters", "0", "--save", ckpt], argv + go_on,
                                         argv + go_on + ["--tensor-model-parallel-size", "2"]], world_size=2)
    assert abs(tp1[0][1] - tp2[0][1]) < 1e-5, (tp1, tp2)
    saved = read_checkpoint_args(ckpt)  # either checkpoint format (the default, torch_dist, here)
    assert (saved["unpadded_vocab_size"], saved["padded_vocab_size"]) == (257, 384)
    # At initialisation the model is near uniform over the real ids: log(257) = 5.55, not log(384) = 5.95.
    assert abs(tp1[0][1] - 5.55) < 0.05


def _converted_model_checks(rank, world_size, checkpoints, sequence, cases):
    """For each (checkpoint, TP): the training path's loss (GPTModel with
    labels -> megatron-core's vocab-parallel cross-entropy ->
    pretrain_gpt.loss_func) and whether the inference logits are -inf exactly
    on the padding rows; then, at the last TP, the masked cross-entropy cases."""
    import pretrain_gpt
    from megatron.training import inference

    tokens, labels = sequence[:, :-1], sequence[:, 1:]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = []
    for load_dir, tp in checkpoints:
        args, model = inference.load_model(load_dir, tp)
        with torch.no_grad():
            per_token = model[0](tokens, positions, None, labels=labels)
        loss, _ = pretrain_gpt.loss_func(torch.ones_like(labels, dtype=torch.float), per_token)
        logits = inference.forward_logits(args, model, tokens)  # what tasks/ and generation read
        excluded = bool(torch.isneginf(logits[..., 257:]).all() and torch.isfinite(logits[..., :257]).all())
        out.append((float(loss), excluded))
        if (load_dir, tp) != checkpoints[-1]:
            inference.unload()
    return out, _masked_vocab_parallel_loss(cases, rank, world_size)


def test_converted_hf_model_loss_equals_transformers_and_the_mask_is_tp_safe(tmp_path):
    """A 257-token HF Llama converted to Megatron at TP=1 (padded to 320 rows)
    and TP=2 (384 rows): the training loss equals transformers' own loss
    (labels=, its cross-entropy over its 257 rows; fp32: 1e-5), and the
    inference logits the tasks read are -inf on the padding rows.
    The mask itself, at TP=2, against torch's cross-entropy over the real
    columns only: a vocabulary ending inside rank 1's slice, and one ending in
    rank 0's slice (rank 1 all padding). Same maths, another summation order: 1e-6."""
    from tests.tools.checkpoint.test_conversion import make_hf_model, to_megatron
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model(tmp_path / "hf", vocab_size=257, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, tie_word_embeddings=False)
    sequence = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = float(hf(sequence, labels=sequence).loss)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for vocab in (150, 100):
        full = torch.randn(5, 3, 256, generator=gen) * 3  # [seq, batch, padded vocab]
        cases.append((full, torch.randint(0, vocab, (5, 3), generator=gen), vocab))
    checkpoints = [(to_megatron(hf_dir, tmp_path / f"tp{tp}", tp), tp) for tp in (1, 2)]
    results = run_distributed(_converted_model_checks, world_size=2, args=(checkpoints, sequence, cases))
    for losses, _ in results:
        assert all(abs(loss - expected) < 1e-5 and excluded for loss, excluded in losses), (losses, expected)

    for (full, target, vocab), rank0, rank1 in zip(cases, results[0][1], results[1][1]):
        real = full[..., :vocab].clone().requires_grad_(True)
        reference = torch.nn.functional.cross_entropy(real.reshape(-1, vocab), target.reshape(-1),
                                                      reduction="none").view(5, 3)
        reference.sum().backward()
        assert torch.allclose(rank0[0], reference, atol=1e-6) and torch.allclose(rank1[0], reference, atol=1e-6)
        grad = torch.cat([rank0[1], rank1[1]], dim=-1)
        assert torch.allclose(grad[..., :vocab], real.grad, atol=1e-6)
        assert torch.all(grad[..., vocab:] == 0), "padding columns must get no gradient"


def test_the_fused_cross_entropy_on_masked_logits_equals_the_unpadded_softmax():
    """The kernels' fused cross-entropy (Liger's, at megatron-core's fused call
    site) on logits masked by mask_padded_logits: torch's cross-entropy over the
    real columns, and no gradient into the padding. fp32 (Triton interpreter on
    CPU): 1e-5 / 1e-6."""
    from megatron.core.models.common.language_module import language_module

    from megatron.training.kernels import hooks
    from megatron.training.kernels.selection import KernelSelection
    from megatron.training.models.padded_vocab import mask_padded_logits

    hooks.install(KernelSelection({"cross_entropy": "liger"}))
    try:
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(4, 2, 64, generator=gen) * 3).requires_grad_()  # 50 real ids padded to 64
        target = torch.randint(0, 50, (4, 2), generator=gen)
        loss = language_module.fused_vocab_parallel_cross_entropy(mask_padded_logits(logits, 50), target, None)
        loss.sum().backward()
    finally:
        hooks.install(KernelSelection({}))
    real = logits.detach()[..., :50].clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(real.reshape(-1, 50), target.reshape(-1), reduction="none")
    reference.sum().backward()
    torch.testing.assert_close(loss, reference.view(4, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad[..., :50], real.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(logits.grad[..., 50:] == 0)
