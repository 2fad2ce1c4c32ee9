"""The default core attention without Transformer Engine (torch SDPA, models/sdpa_attention.py) against
megatron-core's unfused softmax path (--attention-backend unfused), at TP=2 with grouped-query attention:
the same weights give the same logits and the same gradients for causal, right-padded and packed
(block-diagonal causal) masks; attention dropout draws per TP rank and keeps the expectation; the
start-up line names the choice and the opt-out restores megatron-core's module. One 2-process run."""

import contextlib
import io

import pytest
import torch

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.distributed.launcher import run_distributed
from tests.training.pretrain_runner import TINY_LLAMA

# fp32 on CPU: SDPA's flash kernel (online softmax over key blocks) and megatron-core's
# softmax of the full score matrix sum in another order, ~1e-6 apart; a mask applied to the
# wrong keys, a lost GQA group or a wrong scale moves the logits by > 1e-2.
LOGITS_ATOL = 2e-5
GRAD_RTOL = 1e-4  # of each gradient's largest entry

SEQ, BATCH = 16, 2
ARGV = [a if a != "32" else str(SEQ) for a in TINY_LLAMA] + [
    "--mock-data", "--vocab-size", "256", "--micro-batch-size", str(BATCH), "--lr", "1e-3", "--train-iters", "1",
    "--tensor-model-parallel-size", "2", "--seed", "1234",
    # bare models (no DDP wrapper, so no main grads for the fused weight-gradient accumulation)
    "--no-gradient-accumulation-fusion"]


def _masks():
    """{kind: megatron-core's mask [b, 1, s, s], True = masked (None: causal by the kernel)}."""
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    lengths = torch.tensor([SEQ, 11])  # right padding: the pads' own rows still see the real tokens
    keys = torch.arange(SEQ)[None, :] < lengths[:, None]
    padded = ~(causal[None] & keys[:, None, :])
    documents = torch.zeros(BATCH, SEQ, dtype=torch.long)  # packed: documents 0 | 1 | 2 laid end to end
    for b, starts in enumerate(([5, 12], [9])):
        for start in starts:
            documents[b, start:] += 1
    packed = ~(causal[None] & (documents[:, :, None] == documents[:, None, :]))
    return {"causal": None, "padded": padded[:, None], "packed": packed[:, None]}


def _run(model, tokens, labels, mask):
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    losses = model(tokens, positions, mask, labels=labels)  # [b, s], vocab-parallel cross-entropy
    losses.mean().backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def _dropout_checks(config, rank):
    """SDPAttention with dropout 0.3 on this rank's heads: draws differ from the no-dropout output and
    between TP ranks, repeat under the same RNG state, and average to the no-dropout output."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.training.models.sdpa_attention import SDPAttention

    attention = SDPAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.3)
    g = torch.Generator().manual_seed(7)  # the same q, k, v on both ranks
    q = torch.randn(8, 2, 2, 16, generator=g)
    k, v = (torch.randn(8, 2, 1, 16, generator=g) for _ in range(2))
    expected = attention.eval()(q, k, v, None)
    attention.train()
    tensor_parallel.model_parallel_cuda_manual_seed(99)
    state = tensor_parallel.get_cuda_rng_tracker().get_states()
    first = attention(q, k, v, None)
    tensor_parallel.get_cuda_rng_tracker().set_states(state)
    again = attention(q, k, v, None)
    draws = torch.stack([attention(q, k, v, None) for _ in range(400)])
    others = [torch.empty_like(first) for _ in range(2)]
    torch.distributed.all_gather(others, first)
    # |mean - expected| in units of the standard error of the mean of 400 draws
    z = ((draws.mean(0) - expected).abs() / (draws.std(0) / 20).clamp(min=1e-6)).max().item()
    return {"differs": not torch.allclose(first, expected), "repeats": torch.equal(first, again),
            "ranks_differ": not torch.equal(others[0], others[1]), "z": z}


def _compare(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import pretrain_gpt
    from megatron.training import arguments, kernels, training
    from megatron.training.models.sdpa_attention import SDPAttention

    models, lines = {}, {}
    for name, flags in (("sdpa", []), ("unfused", ["--attention-backend", "unfused"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if name == "sdpa":  # the process groups, once
                args = training.setup_args(ARGV + flags)
            else:
                args = arguments.parse_args(ARGV + flags)
                arguments.validate_args(args, world_size)
                kernels.configure(args)
                training._print_args(args)
        lines[name] = next((line for line in out.getvalue().splitlines() if "attention:" in line), None)  # rank 0
        training.build_tokenizer_from_args(args)  # the padded vocabulary size
        config = arguments.transformer_config_from_args(args)
        torch.manual_seed(0)
        models[name] = pretrain_gpt.model_provider(args, config)
        if name == "sdpa":
            dropout = _dropout_checks(config, rank)
    sdpa, unfused = models["sdpa"], models["unfused"]
    unfused.load_state_dict(sdpa.state_dict())
    kinds = {name: {type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers}
             for name, model in models.items()}
    assert kinds == {"sdpa": {SDPAttention.__name__}, "unfused": {DotProductAttention.__name__}}

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    diffs = {}
    for kind, mask in _masks().items():
        (logits_a, grads_a), (logits_b, grads_b) = (_run(m, tokens, labels, mask) for m in (sdpa, unfused))
        grad_err = max(((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp(min=1e-12)).item()
                       for n in grads_b)
        diffs[kind] = {"logits": (logits_a - logits_b).abs().max().item(), "grads": grad_err,
                       "logits_scale": logits_b.abs().max().item()}
    parallel_state.destroy_model_parallel()
    return {"diffs": diffs, "lines": lines, "dropout": dropout}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_compare, world_size=2)


@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_sdpa_gives_the_unfused_logits_and_gradients_at_tp2_with_gqa(results, kind):
    for rank in results:
        d = rank["diffs"][kind]
        assert d["logits_scale"] > 1e-2  # the comparison is not between zeros
        assert d["logits"] <= LOGITS_ATOL, (kind, d)
        assert d["grads"] <= GRAD_RTOL, (kind, d)


def test_attention_dropout_draws_per_rank_and_keeps_the_expectation(results):
    for rank in results:
        d = rank["dropout"]
        assert d["differs"] and d["repeats"] and d["ranks_differ"], d
        # A missing 1 / (1 - p) rescale moves the mean by ~0.3 of the output: z in the tens.
        assert d["z"] < 6.0, d


def test_start_up_line_says_sdpa_by_default_and_the_opt_out_restores_the_unfused_path(results):
    lines = results[0]["lines"]
    assert "attention: local + torch SDPA (fused)" in lines["sdpa"]
    assert "attention: local (unfused softmax, --attention-backend unfused)" in lines["unfused"]


def test_use_flash_attn_and_an_unfused_backend_contradict_each_other():
    args = parse_args(ARGV + ["--use-flash-attn", "--attention-backend", "local"])
    with pytest.raises(ArgumentError, match="--use-flash-attn asks for fused attention and --attention-backend local"):
        validate_args(args, 2)
    validate_args(parse_args(ARGV + ["--use-flash-attn"]), 2)  # Megatron-LM scripts pass it: the default
