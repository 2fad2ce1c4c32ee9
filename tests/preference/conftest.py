"""A tiny preference task shared by the preference tests: a word-level HF
tokenizer with its own chat template, a tiny random Llama (the reference) and
a perturbed copy of it (a policy that differs from the reference), both as HF
directories and as Megatron checkpoints (tools/checkpoint/util.py), and
chat-format preference records preprocessed with the tokenizer's template."""

import json
import os
import random

import pytest

from tests.sft.conftest import make_word_tokenizer, write_jsonl

WORDS = [f"w{i}" for i in range(40)]
MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
SEQ_LENGTH = 24


def chat_records(rng, n, good="w1"):
    """Chat records whose chosen reply ends with `good` and whose rejected reply ends with another word."""
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 6)))
        chosen = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 4))) + " " + good
        rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 4))) + " " + rng.choice(
            [w for w in WORDS if w != good])
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def _hf_model(path, tokenizer_dir, vocab, seed, noise=0.0, base=None):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab["<s>"], eos_token_id=vocab["<|end|>"],
                         pad_token_id=vocab["<unk>"], **MODEL)
    model = LlamaForCausalLM(config)
    if base is not None:
        model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return model


def _convert(hf_dir, out):
    from tools.checkpoint import util

    assert util.main(["--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf_dir,
                      "--save-dir", out, "--target-tensor-parallel-size", "1",
                      "--target-pipeline-parallel-size", "1", "--make-vocab-size-divisible-by", "32"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{tokenizer, reference_hf, policy_hf, reference, policy (Megatron checkpoints), train, valid (prefixes)}."""
    from megatron.training.data.preference_preprocess import PreferencePreprocessConfig, preprocess_preference

    root = tmp_path_factory.mktemp("preference")
    tokenizer, vocab = make_word_tokenizer(root / "tokenizer", WORDS)
    reference = _hf_model(str(root / "reference_hf"), tokenizer, vocab, seed=0)
    _hf_model(str(root / "policy_hf"), tokenizer, vocab, seed=1, noise=0.02, base=reference)
    out = {"tokenizer": tokenizer, "vocab": vocab, "root": str(root),
           "reference_hf": str(root / "reference_hf"), "policy_hf": str(root / "policy_hf"),
           "reference": _convert(str(root / "reference_hf"), str(root / "reference")),
           "policy": _convert(str(root / "policy_hf"), str(root / "policy"))}
    rng = random.Random(0)
    for split, n in (("train", 48), ("valid", 16)):
        write_jsonl(root / f"{split}.jsonl", chat_records(rng, n))
        preprocess_preference(PreferencePreprocessConfig(
            input=str(root / f"{split}.jsonl"), output_prefix=str(root / split), tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=tokenizer, seq_length=SEQ_LENGTH), log=lambda m: None)
        out[split] = str(root / split)
    return out


def driver_flags(load, data, extra=()):
    """finetune_dpo.py flags: the tiny model from its checkpoint, fp32, no dropout, SGD-free Adam, clip off."""
    return ["--load", load, "--finetune", "--use-checkpoint-args", "--data-path", data,
            "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--lr-decay-style", "constant", "--train-iters", "1", "--eval-iters", "0",
            "--log-interval", "1", "--clip-grad", "1e9", "--seed", "1234", "--attention-dropout", "0",
            "--hidden-dropout", "0", *extra]


def records_json(records):
    return "\n".join(json.dumps(r) for r in records)


@pytest.fixture(scope="session")
def ours(tiny):
    """test_trl_parity.py: our side of one DPO step per case."""
    from tests.preference.test_trl_parity import run_ours

    return run_ours(tiny)


@pytest.fixture(scope="session")
def theirs(tiny, ours, tmp_path_factory):
    """TRL's side (DPOTrainer per case, and CPOTrainer.cpo_loss for test_preference_loss.py), in one process."""
    from tests.preference.test_preference_loss import cpo_calls
    from tests.preference.test_trl_parity import run_theirs

    return run_theirs(tiny, ours, str(tmp_path_factory.mktemp("trl")), cpo_calls())
