"""tasks/perplexity.py: windows, the sliding-window protocol against a direct
per-token computation, and Megatron checkpoint (TP=1, TP=2) == its HF export."""

import math

import numpy as np
import pytest
import torch

from tasks.lm import EvalError
from tasks import perplexity
from tasks.perplexity import evaluate_perplexity, read_indexed_tokens, read_jsonl_tokens, window_plan
from tests.tasks.conftest import CountingLM, Interrupted, eval_args, hf_lm, tokenizer

# fp32 on CPU; the two sides differ only in the order of reductions (TP
# all-reduce, fused vs split matmuls). The bound; a wrong vocabulary
# trimming or a missing PI factor moves the loss by > 1e-2.
REL = 1e-4


@pytest.mark.parametrize("n,length,stride", [(10, 4, 2), (100, 32, 32), (100, 32, 8), (101, 32, 5), (33, 32, 1),
                                             (5, 32, 16)])
def test_windows_score_every_token_once(n, length, stride):
    scored = []
    for begin, end, first in window_plan(n, length, stride):
        assert end - begin <= length and first > begin
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_stride_outside_window_is_an_error():
    with pytest.raises(EvalError, match="between 1 and --seq-length"):
        window_plan(100, 32, 33)


def _context_start(t, length, stride):
    """The sliding-window protocol written as a formula: token t is predicted
    from the window that first covers it, which starts at a multiple of
    `stride`, and from every earlier token of that window."""
    return 0 if t <= length else stride * math.ceil((t - length) / stride)


@pytest.mark.parametrize("length,stride", [(32, 8), (16, 16)])
def test_sliding_window_equals_direct_computation(driver_checkpoint, indexed_corpus, sp_model, length, stride):
    lm = hf_lm(driver_checkpoint[1], sp_model)
    tokens = read_indexed_tokens(indexed_corpus, max_tokens=90)
    got = evaluate_perplexity(lm, tokens, length, stride, batch_size=3)

    nll = 0.0
    t_tokens = torch.as_tensor(tokens)
    for t in range(1, len(tokens)):
        begin = _context_start(t, length, stride)
        assert t - begin <= length
        logprobs = lm.log_probs(t_tokens[begin:t].unsqueeze(0))
        nll -= float(logprobs[0, -1, t_tokens[t]])
    assert got["tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / (len(tokens) - 1)), rel=1e-5)


def test_jsonl_tokens_match_the_indexed_dataset(corpus, indexed_corpus, sp_model):
    """--jsonl tokenizes as tools/preprocess_data.py did (BOS, text, EOD)."""
    from_jsonl = read_jsonl_tokens(corpus, tokenizer(sp_model), max_tokens=3000)
    assert np.array_equal(from_jsonl, read_indexed_tokens(indexed_corpus, max_tokens=3000))


def _rows(result):
    return {(r["seq_length"], r["stride"]): r for r in result["rows"]}


def test_megatron_perplexity_equals_hf_export(megatron_runs, driver_checkpoint, indexed_corpus, sp_model):
    tokens = read_indexed_tokens(indexed_corpus, max_tokens=600)
    hf = hf_lm(driver_checkpoint[1], sp_model)
    hf_pi2 = hf_lm(driver_checkpoint[1], sp_model, "--rotary-seq-len-interpolation-factor", "2")
    for run, model in (("ppl_tp1", hf), ("ppl_tp2", hf), ("ppl_tp2_pi2", hf_pi2)):
        for (length, stride), row in _rows(megatron_runs[run]).items():
            expected = evaluate_perplexity(model, tokens, length, stride)
            assert row["tokens"] == expected["tokens"] == 599 and row["windows"] == expected["windows"]
            assert row["loss"] == pytest.approx(expected["loss"], rel=REL), (run, length)
            assert row["ppl"] == pytest.approx(expected["ppl"], rel=REL), (run, length)
    assert all(r["interpolation_factor"] == 2.0 for r in megatron_runs["ppl_tp2_pi2"]["rows"])


def test_interpolation_factor_at_evaluation_time(megatron_runs, planted, sp_model):
    """The memorising model's perplexity on its own texts with PI factor 2 given
    at evaluation time: Megatron TP=2 == transformers with linear rope scaling 2,
    and far from the unscaled model's."""
    bench, _, model_dir = planted
    (row,) = megatron_runs["ppl_planted_pi2"]["rows"]
    tokens = read_jsonl_tokens(f"{bench}/texts.jsonl", tokenizer(sp_model))
    scaled = evaluate_perplexity(hf_lm(model_dir, sp_model, "--rotary-seq-len-interpolation-factor", "2"), tokens, 64)
    plain = evaluate_perplexity(hf_lm(model_dir, sp_model), tokens, 64)
    assert row["loss"] == pytest.approx(scaled["loss"], rel=REL)
    assert row["loss"] > plain["loss"] + 0.1, (row["loss"], plain["loss"])


def test_vocabulary_mismatch_is_a_clear_error(driver_checkpoint, sp_model):
    from megatron.training.checkpoint.save_load import read_checkpoint_args
    from megatron.training.tokenizer import build_tokenizer
    from tasks.lm import check_vocab

    saved = read_checkpoint_args(driver_checkpoint[0])
    assert check_vocab(tokenizer(sp_model), saved, "ckpt") == 500  # the padding rows are left out
    with pytest.raises(EvalError, match="vocabulary mismatch.*512 embedding rows.*1001 tokens.*Llama2Tokenizer"):
        check_vocab(build_tokenizer("NullTokenizer", vocab_size=1000), saved, "ckpt")
    with pytest.raises(EvalError, match="1001 tokens but .* has 500 embedding rows"):
        hf_lm(driver_checkpoint[1], sp_model, "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000")


def test_interrupted_run_resumes_from_partial_results(driver_checkpoint, indexed_corpus, sp_model, tmp_path):
    """Stopped midway, a rerun of the same command scores only the batches the
    partial file lacks and reports exactly (bit for bit) the uninterrupted numbers."""
    lm = hf_lm(driver_checkpoint[1], sp_model)
    flags = ["--task", "perplexity", "--hf-model", driver_checkpoint[1], "--data-path", indexed_corpus,
             "--seq-length", 32, 16, "--stride", 8, 16, "--max-tokens", 300, "--micro-batch-size", 3]
    partial = ["--results-file", tmp_path / "ppl.partial.jsonl"]
    whole = CountingLM(lm)
    expected = perplexity.run(eval_args(flags), whole)  # no partial file
    assert whole.calls == 13 + 7  # by 3: 35 windows (34 of 32 tokens + a shorter one), 19 windows (18 + 1)

    with pytest.raises(Interrupted):
        perplexity.run(eval_args(flags + partial), CountingLM(lm, limit=14))  # stops in the second length
    resumed = CountingLM(lm)
    assert perplexity.run(eval_args(flags + partial), resumed) == expected
    assert resumed.calls == whole.calls - 14

    again = CountingLM(lm)  # a finished file: nothing left to score
    assert perplexity.run(eval_args(flags + partial), again) == expected and again.calls == 0
    with pytest.raises(EvalError, match="other settings \\(stride differ\\)"):
        perplexity.run(eval_args([str(f) for f in flags[:-4]] + ["--stride", "4", "16", "--max-tokens", "300",
                                 "--micro-batch-size", "3"] + partial), lm)


def test_an_hf_models_own_rope_scaling_is_its_pi_factor(indexed_corpus, sp_model, tmp_path):
    """An --hf-model export that carries rope_scaling linear 2 reports PI factor 2
    in the table, as the loss it computes uses (the factor of an --hf-model run
    without --rotary-seq-len-interpolation-factor used to print as 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0})).save_pretrained(tmp_path / "pi2")
    flags = ["--task", "perplexity", "--hf-model", tmp_path / "pi2", "--data-path", indexed_corpus,
             "--seq-length", 32, "--max-tokens", 100]
    lm = hf_lm(str(tmp_path / "pi2"), sp_model)
    (row,) = perplexity.run(eval_args(flags), lm)
    assert lm.interpolation_factor == row["interpolation_factor"] == 2.0
    header, _, line = perplexity.perplexity_table([row]).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert float(cells["PI factor"]) == 2.0
