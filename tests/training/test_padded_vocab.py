"""Vocabulary padding rows are excluded from the softmax (issue #15, finding 8):
the loss does not depend on how much a layout pads, and a converted Hugging
Face model's loss is transformers' own."""

import torch

from tests.distributed.launcher import run_distributed
from tests.training.pretrain_runner import SCHEDULE, TINY_LLAMA, run_pretrain


def _masked_vocab_parallel_loss(rank, world_size, cases):
    """megatron-core's vocab-parallel cross-entropy on this TP rank's slice of
    padded logits, masked; returns (loss, gradient of this rank's slice) per case."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron.training import cpu_backend
    from megatron.training.models.padded_vocab import mask_padded_logits, vocab_slice_start

    cpu_backend.activate()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    out = []
    for full, target, vocab in cases:
        width = full.shape[-1] // world_size
        piece = full[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
        masked = mask_padded_logits(piece, vocab, vocab_slice_start(width, full.shape[-1], rank))
        loss = vocab_parallel_cross_entropy(masked, target)
        loss.sum().backward()
        out.append((loss.detach(), piece.grad))
    return out


def test_masked_vocab_parallel_cross_entropy_equals_the_unpadded_softmax():
    """Against torch's cross-entropy over the real columns only, at TP=2: a
    vocabulary ending inside rank 1's slice, and one ending in rank 0's slice
    (rank 1 all padding). fp32, same maths in another summation order: 1e-6."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for vocab in (150, 100):
        full = torch.randn(5, 3, 256, generator=gen) * 3  # [seq, batch, padded vocab]
        target = torch.randint(0, vocab, (5, 3), generator=gen)
        cases.append((full, target, vocab))
    results = run_distributed(_masked_vocab_parallel_loss, world_size=2, args=(cases,))
    for (full, target, vocab), rank0, rank1 in zip(cases, *results):
        real = full[..., :vocab].clone().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(real.reshape(-1, vocab), target.reshape(-1),
                                                     reduction="none").view(5, 3)
        expected.sum().backward()
        assert torch.allclose(rank0[0], expected, atol=1e-6) and torch.allclose(rank1[0], expected, atol=1e-6)
        grad = torch.cat([rank0[1], rank1[1]], dim=-1)
        assert torch.allclose(grad[..., :vocab], real.grad, atol=1e-6)
        assert torch.all(grad[..., vocab:] == 0), "padding columns must get no gradient"


# 257 ids padded to a multiple of 128 x TP: 384 rows at TP=1, 512 at TP=2.
VOCAB_257 = ["--mock-data", "--vocab-size", "257", "--make-vocab-size-divisible-by", "128", "--split", "98,1,1",
             "--micro-batch-size", "2", "--global-batch-size", "4"]


def test_loss_does_not_move_when_tp_changes_the_padding(tmp_path):
    """The issue's case: the same weights continued at TP=1 and at TP=2 give
    the same first loss (it rose by log(512/384) = 0.29 nats before). The two
    layouts differ only in the order of fp32 reductions: 1e-5."""
    ckpt = str(tmp_path / "ckpt")
    argv = TINY_LLAMA + SCHEDULE + VOCAB_257
    run_pretrain(argv + ["--train-iters", "0", "--save", ckpt])
    go_on = ["--load", ckpt, "--finetune", "--train-iters", "1", "--lr-warmup-iters", "0"]
    tp1 = run_pretrain(argv + go_on)
    tp2 = run_pretrain(argv + go_on + ["--tensor-model-parallel-size", "2"], world_size=2)
    assert abs(tp1[0][1] - tp2[0][1]) < 1e-5, (tp1, tp2)
    # At initialisation the model is near uniform over the real ids: log(257) = 5.55, not log(384) = 5.95.
    assert abs(tp1[0][1] - 5.55) < 0.05


def _training_loss(rank, world_size, load_dir, tp, sequence):
    """The training path's loss (GPTModel with labels -> megatron-core's
    vocab-parallel cross-entropy -> pretrain_gpt.loss_func) of a converted checkpoint."""
    import pretrain_gpt
    from megatron.training import inference

    args, model = inference.load_model(load_dir, tp)
    tokens, labels = sequence[:, :-1], sequence[:, 1:]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        per_token = model[0](tokens, positions, None, labels=labels)
    loss, _ = pretrain_gpt.loss_func(torch.ones_like(labels, dtype=torch.float), per_token)
    inference.unload()
    return float(loss)


def test_converted_hf_model_loss_equals_transformers(tmp_path):
    """A 257-token HF Llama converted to Megatron at TP=1 (padded to 320 rows)
    and TP=2 (384 rows): the training loss equals transformers' own loss
    (labels=, its cross-entropy over its 257 rows). fp32: 1e-5."""
    from tests.tools.checkpoint.test_conversion import make_hf_model, to_megatron
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model(tmp_path / "hf", vocab_size=257, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, tie_word_embeddings=False)
    sequence = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = float(hf(sequence, labels=sequence).loss)
    for tp in (1, 2):
        ckpt = to_megatron(hf_dir, tmp_path / f"tp{tp}", tp)
        got = run_distributed(_training_loss, world_size=tp, args=(ckpt, tp, sequence))
        assert all(abs(g - expected) < 1e-5 for g in got), (tp, got, expected)
