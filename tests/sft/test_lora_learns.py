"""A tiny model learns a planted instruction task with LoRA, end to end
through `finetune.py` and the shipped FinLoRA-style example
(examples/finlora: a small pretrained base that knows the sentiment of
financial events but not the instruction; test companies never seen):
preprocess, convert, LoRA on a frozen base (FinLoRA's default targets q, k, v),
export to a peft directory (the base's tokenizer files beside it), and
finetune.py's own task accuracy step (eval_accuracy: greedy answers of the
trained checkpoint); then held-out accuracy with peft over the HF base, which
gives the same count of exact answers."""

import filecmp
import json
import os
import re

import pytest

from tests.sft.test_finetune_config import REPO

EXAMPLE = os.path.join(REPO, "examples", "finlora")


def _accuracy(model_dir, adapter=None):
    import sys

    if EXAMPLE not in sys.path:
        sys.path.insert(0, EXAMPLE)
    import accuracy

    with open(os.path.join(EXAMPLE, "data", "sentiment_test.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return accuracy.accuracy(accuracy.load_model(model_dir, adapter), os.path.join(EXAMPLE, "base"), records)


@pytest.mark.slow
def test_lora_learns_the_instruction_from_chance_to_near_100_percent(tmp_path, capfd):
    import finetune

    with open(os.path.join(REPO, "finetune_configs.json")) as f:
        entry = json.load(f)["sentiment_tiny_r8"]
    paths = {k: os.path.join(REPO, entry[k]) for k in ("base_model", "dataset_path", "valid_dataset_path")}
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({"lora_tiny": dict(entry, **paths, save_dir=str(tmp_path / "out"), num_epochs=1,
                                                     export_hf=False, log_interval=10, eval_accuracy=True)}))
    assert finetune.main(["lora_tiny", "--configs", str(configs)]) == 0
    log = capfd.readouterr().out
    assert "--lora-rank 8" in log and "--lora-target-modules q_proj k_proj v_proj" in log and "--saver peft" in log
    validation = [float(v) for v in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", log)]
    adapter = tmp_path / "out" / "adapter"
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == paths["base_model"]

    for name in os.listdir(paths["base_model"]):
        if name.startswith("tokenizer") or name.startswith("chat_template"):
            assert filecmp.cmp(os.path.join(paths["base_model"], name), adapter / name, shallow=False), name
    assert not (adapter / "config.json").exists()  # transformers would take the folder for a whole model

    before, after = _accuracy(paths["base_model"]), _accuracy(paths["base_model"], str(adapter))
    with open(tmp_path / "out" / "accuracy.json") as f:
        ours = json.load(f)
    print(f"held-out accuracy (exact answer, forced choice of 3): before {before}, after {after}; "
          f"finetune.py's step: {ours['exact_count']}/{ours['examples']}; validation loss {validation}")
    assert before[0] <= 1 / 3, before  # the base does not answer the instruction (chance would be 1/3)
    assert after[0] >= 0.9 and after[1] >= 0.9, after
    assert validation[-1] < 0.1
    # the trained checkpoint's greedy answers (Megatron, tasks/answers.py) score as transformers + peft's do
    assert ours["examples"] == 72 and ours["exact_count"] == round(after[0] * 72)
    assert ours["settings"]["iteration"] == int(open(tmp_path / "out" / "checkpoints" /
                                                     "latest_checkpointed_iteration.txt").read())
    assert f"exact match {ours['exact_match']:.4f} ({ours['exact_count']}/72)" in log
