"""Preference pairs for the DPO example of finetune_configs.json
(`sentiment_tiny_dpo_r8`), derived from the committed sentiment records: the
prompt is FinLoRA's instruction and headline, the chosen reply its right
label, the rejected reply another label drawn at random. TRL's standard
format, {"prompt", "chosen", "rejected"}; deterministic.

    python examples/finlora/make_preference_data.py     # writes data/sentiment_pref_{train,test}.jsonl
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = ("negative", "neutral", "positive")
TRAIN_PAIRS = 320  # the first records of sentiment_train.jsonl; the test set is the whole held-out file


def pairs(path, count, rng):
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:count]
    return [{"prompt": r["context"], "chosen": r["target"],
             "rejected": rng.choice([label for label in LABELS if label != r["target"]])} for r in records]


def main():
    rng = random.Random(26)
    for split, count in (("train", TRAIN_PAIRS), ("test", None)):
        out = os.path.join(HERE, "data", f"sentiment_pref_{split}.jsonl")
        with open(out, "w", encoding="utf-8") as f:
            for row in pairs(os.path.join(HERE, "data", f"sentiment_{split}.jsonl"), count, rng):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
