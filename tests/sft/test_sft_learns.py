"""End to end through the named-configuration front end: a random tiny HF
Llama with a word tokenizer and its own chat template -> `finetune.py
<config>` (preprocess, convert, fine-tune with packing and a held-out
validation file, export to HF) -> greedy generation with transformers on
held-out prompts. The task maps an entity to its colour whatever the
question's wording; each held-out prompt uses a wording the training set
never pairs with that entity. Accuracy goes from chance to near 100%."""

import filecmp
import json
import os
import re

import pytest
import torch

from tests.sft.conftest import make_word_tokenizer, write_jsonl

ENTITIES = [f"e{i}" for i in range(16)]
COLOURS = [f"c{i}" for i in range(8)]
WORDINGS = ["what colour is {} ?", "tell me the colour of {}", "{} has which colour ?", "colour of {} please"]


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def split_records():
    train, held_out = [], []
    for i, e in enumerate(ENTITIES):
        for k, wording in enumerate(WORDINGS):
            (held_out if k == i % len(WORDINGS) else train).append(chat(wording.format(e), COLOURS[i % 8]))
    return train, held_out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("base")
    words = ENTITIES + COLOURS + " ".join(WORDINGS).replace("{}", "").split()
    _, vocab = make_word_tokenizer(path, words)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


def held_out_accuracy(model_dir, tokenizer_dir, held_out):
    """Share of held-out prompts whose greedy continuation is exactly the colour then EOS."""
    from transformers import AutoModelForCausalLM

    from megatron.training.data.sft_formats import record_to_conversation
    from megatron.training.data.sft_templates import SFTEncoder
    from megatron.training.tokenizer import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir, legacy=False)
    encoder = SFTEncoder(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for record in held_out:
        conv = record_to_conversation(record)
        prompt = torch.tensor([encoder.encode_prompt(conv)])
        out = model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=tok.eod)
        answer = conv.turns[-1][1]
        correct += out[0, prompt.shape[1]:].tolist() == tok.tokenize(answer) + [tok.eod]
    return correct / len(held_out)


def test_finetune_config_learns_held_out_prompts(tmp_path, base_model, capfd, monkeypatch):
    import finetune

    train, held_out = split_records()
    configs = tmp_path / "finetune_configs.json"
    configs.write_text(json.dumps({"colours_tiny": {
        "base_model": base_model, "dataset_path": write_jsonl(tmp_path / "train.jsonl", train),
        "valid_dataset_path": write_jsonl(tmp_path / "valid.jsonl", held_out), "save_dir": "out",
        "learning_rate": 0.003, "min_lr": 0.0003, "warmup_ratio": 0.05, "num_epochs": 40, "batch_size": 4,
        "gradient_accumulation_steps": 2, "seq_length": 32, "packing": True, "log_interval": 20}}))
    assert finetune.main(["colours_tiny", "--configs", str(configs)]) == 0
    log = capfd.readouterr()
    out = str(tmp_path / "out")
    # each step ran: preprocessing, HF -> Megatron, training from the base with --finetune, export
    assert os.path.exists(os.path.join(out, "data", "valid_loss_mask_document.idx"))
    assert "--finetune" in log.out and "--saver hf" in log.out
    for name in os.listdir(base_model):  # the export keeps the base's metadata files byte for byte
        if name.endswith(".json") or name.endswith(".jinja"):
            assert filecmp.cmp(os.path.join(base_model, name), os.path.join(out, "hf", name), shallow=False), name
    validation = [float(v) for v in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", log.out)]
    assert len(validation) >= 10 and validation[-1] < 0.5 * validation[0], validation

    chance = 1 / len(COLOURS)
    before = held_out_accuracy(base_model, base_model, held_out)
    after = held_out_accuracy(os.path.join(out, "hf"), base_model, held_out)
    print(f"held-out accuracy: before {before:.2f}, after {after:.2f}; validation loss {validation[0]:.3f} -> {validation[-1]:.3f}")
    assert before <= chance + 0.07, before  # a random model: at most one lucky prompt of 16
    assert after >= 0.9, f"held-out accuracy {after:.2f} (before fine-tuning {before:.2f})"

    # Rerunning the finished configuration says so and stops: no dataset is built, no step runs.
    from megatron.training import finetune_config

    def no_datasets(*args):
        raise AssertionError("a finished configuration must not build its datasets again")

    monkeypatch.setattr(finetune_config, "samples_per_epoch", no_datasets)
    capfd.readouterr()
    assert finetune.main(["colours_tiny", "--configs", str(configs)]) == 0
    again = capfd.readouterr().out
    checkpoints = os.path.join(out, "checkpoints")
    iteration = open(os.path.join(checkpoints, "latest_checkpointed_iteration.txt")).read().strip()
    assert f"colours_tiny is already done: {checkpoints} holds iteration {iteration}, the end of its training" in again
    assert "+ " not in again, again
