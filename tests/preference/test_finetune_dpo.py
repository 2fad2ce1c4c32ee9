"""`python finetune.py NAME` runs a DPO configuration with LoRA end to end
(LLaMA-Factory's keys stage, pref_loss, pref_beta beside FinLoRA's lora_*):
preprocess the chat-format pairs, convert the tiny HF base, train
finetune_dpo.py (reference = the base with the adapters off), export a peft
directory; and the tiny model learns a planted preference: the chosen reply
always ends with the word w1, the rejected one with another word. Held out
(pairs never trained on), the base prefers the chosen reply about half the
time (chance), and after one epoch the DPO reward of the adapter loaded with
stock peft on the HF base, beta (log pi(c) - log base(c) - log pi(r) + log
base(r)), prefers the chosen reply in nearly every pair, as the driver's own
validation metric says."""

import json
import random
import re

import torch

from tests.preference.conftest import chat_records
from tests.sft.conftest import write_jsonl

BETA = 0.1


def _heldout(base_dir, adapter_dir, prefix, seq_length):
    """(base preference, DPO reward accuracy) over the preprocessed pairs, with transformers and peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron.training.data.preference_dataset import PreferenceDataset

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    model.eval()
    ds = PreferenceDataset(prefix, seq_length, shuffle=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    tokens, labels, mask = (batch[k].reshape(-1, seq_length) for k in ("tokens", "labels", "loss_mask"))

    def logps():
        with torch.no_grad():
            logits = model(input_ids=tokens).logits.float()
        per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
        return (per_token * mask).sum(-1).view(-1, 2)  # [pairs, (chosen, rejected)]

    policy = logps()
    with model.disable_adapter():
        base = logps()
    rewards = BETA * (policy - base)
    return (float((base[:, 0] > base[:, 1]).float().mean()), float((rewards[:, 0] > rewards[:, 1]).float().mean()))


def test_finetune_py_dpo_with_lora_learns_a_planted_preference(tiny, tmp_path, capfd):
    import finetune

    rng = random.Random(1)
    write_jsonl(tmp_path / "train.jsonl", chat_records(rng, 96))
    write_jsonl(tmp_path / "valid.jsonl", chat_records(rng, 32))
    entry = {"base_model": tiny["reference_hf"], "dataset_path": "train.jsonl", "valid_dataset_path": "valid.jsonl",
             "stage": "dpo", "pref_loss": "sigmoid", "pref_beta": BETA, "lora_r": 8, "lora_alpha": 16,
             "lora_dropout": 0.0, "lora_target_modules": "all-linear", "learning_rate": 0.01, "num_epochs": 1,
             "batch_size": 8, "seq_length": 24, "export_hf": False, "log_interval": 4, "save_dir": "out"}
    (tmp_path / "configs.json").write_text(json.dumps({"dpo_tiny": entry}))
    assert finetune.main(["dpo_tiny", "--configs", str(tmp_path / "configs.json")]) == 0
    log = capfd.readouterr().out
    assert "finetune_dpo.py" in log and "--pref-loss sigmoid --pref-beta 0.1" in log and "--lora-rank 8" in log
    assert "--ref-load" not in log  # the reference is the base with the adapters off
    accuracy = [float(v) for v in re.findall(r"validation loss at iteration \d+ \|.*?rewards/accuracies value: (\S+)",
                                             log)]
    adapter = tmp_path / "out" / "adapter"
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny["reference_hf"]

    before, after = _heldout(tiny["reference_hf"], str(adapter), str(tmp_path / "out" / "data" / "valid"), 24)
    print(f"held-out pairs: the base prefers the chosen reply in {before:.0%}; after DPO the reward prefers it in "
          f"{after:.0%} (peft), {accuracy[-1]:.0%} (driver's validation)")
    assert 0.25 <= before <= 0.75, before  # chance: the base knows nothing of the planted word
    assert after >= 0.9 and accuracy[-1] >= 0.9
    assert abs(after - accuracy[-1]) <= 1 / 32  # the exported adapter scores as the driver did (one near-tie at most)
