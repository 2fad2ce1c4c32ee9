"""Evaluation with the tokenizers Llama 3.x and Qwen2.5 ship (tiny copies,
tests/family_tokenizers.py) on tiny random HF models of those classes: the
documents are tokenized as the data tool's --legacy-tokenizer writes them
(Llama 3: <|begin_of_text|> first; Qwen: no BOS), and perplexity is
normalised over the tokenizer's tokens, also for a Qwen model whose embedding
has more rows than its tokenizer has tokens."""

import json

import pytest
import torch

from tests.family_tokenizers import CORPUS, make_llama3_tokenizer, make_qwen2_tokenizer


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}))


def _qwen(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))


# family -> (tokenizer maker, model maker, embedding rows beyond the tokenizer's tokens)
FAMILIES = {"llama3": (lambda p: make_llama3_tokenizer(p, eos="<|end_of_text|>"), _llama, 0),
            "qwen2.5": (lambda p: make_qwen2_tokenizer(p, eos="<|endoftext|>"), _qwen, 8)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_perplexity_of_an_hf_model_with_its_own_tokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    from tasks.lm import document_prefix
    from tasks.main import build_parser, run

    make_tokenizer, make_model, extra_rows = FAMILIES[family]
    path = make_tokenizer(str(tmp_path / "model"))
    hf = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = make_model(len(hf) + extra_rows).eval()
    model.save_pretrained(path)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))

    result, _, _ = run(build_parser().parse_args(["--task", "perplexity", "--hf-model", path, "--jsonl", str(data),
                                                  "--seq-length", "512"]))
    (row,) = result["rows"]

    # independent of tasks/: transformers' tokenizer (special tokens as it adds them) + eos, then the
    # model's log-softmax over the tokenizer's tokens only (no text has the extra rows' ids)
    ids = [i for t in CORPUS for i in hf(t).input_ids + [hf.eos_token_id]]
    assert len(ids) <= 512 and row["tokens"] == len(ids) - 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    assert logits.shape[-1] == len(hf) + extra_rows
    nll = -torch.log_softmax(logits[:, :len(hf)].double(), -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert row["loss"] == pytest.approx(float(nll), rel=1e-5)
    # prompts of the benchmarks start the same way as the documents
    from megatron.training.tokenizer import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", path)
    assert document_prefix(tok) == ([hf.bos_token_id] if family == "llama3" else [])


def test_megatron_checkpoint_of_a_model_with_more_rows_than_tokens(tmp_path):
    """A converted Qwen-style checkpoint (config.json vocab_size 8 above the
    tokenizer's) is evaluated with its tokenizer, normalised over the
    tokenizer's tokens as its HF export is; a checkpoint the driver trained
    with another vocabulary is refused."""
    from megatron.training.tokenizer import build_tokenizer
    from tasks.lm import EvalError, check_vocab

    tok = build_tokenizer("HuggingFaceTokenizer", make_qwen2_tokenizer(str(tmp_path / "tok")))
    n = tok.vocab_size
    converted = {"padded_vocab_size": 512, "unpadded_vocab_size": n + 8, "vocab_size": n + 8,
                 "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 2}
    assert check_vocab(tok, converted, "ckpt") == n
    trained = dict(converted, vocab_size=None)  # the driver's own: unpadded_vocab_size is its tokenizer's
    with pytest.raises(EvalError, match=f"vocabulary mismatch: the checkpoint ckpt has 512 embedding rows"):
        check_vocab(tok, trained, "ckpt")
