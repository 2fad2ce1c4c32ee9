"""--truncation-mode keep_start / keep_end of tools/preprocess_preference_data.py against TRL's own
DPO collator (trl==1.16 DataCollatorForPreference, max_length = seq_length + 1, run in a subprocess
as the other TRL tests are): each side's token ids and loss mask are TRL's input_ids and
completion_mask for the same (prompt, chosen, rejected) ids, and the pairs TRL's trainer drops
(keep_start: the prompt fills max_length) are the ones dropped here and counted in the report.
Without the flag an over-long pair is still refused (test_preference_data.py)."""

import json
import subprocess
import sys

import pytest

from tests.preference.test_preference_data import WORDS, _preprocess

SEQ = 9  # a window of 10 tokens a side
RECORDS = [
    {"prompt": "a b", "chosen": "ok", "rejected": "no c"},                          # fits
    {"prompt": "a b c", "chosen": "ok " * 8, "rejected": "no"},                     # a long chosen response
    {"prompt": "a b c d e f " * 3, "chosen": "ok", "rejected": "no"},               # the prompt fills the window
    {"prompt": "c d e f", "chosen": "a b c d e f", "rejected": "f e d c b a ok"},   # both sides over
]

TRL_COLLATOR = """
import json, sys
from trl.trainer.dpo_trainer import DataCollatorForPreference
examples, max_length, mode = json.load(sys.stdin)
out = []
for example in examples:
    batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)([example])
    rows = []
    for r in range(2):  # chosen, rejected
        n = int(batch["attention_mask"][r].sum())  # right-padded
        rows.append((batch["input_ids"][r, :n].tolist(), batch["completion_mask"][r, :n].tolist()))
    out.append(rows)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.sft.conftest import make_word_tokenizer

    path, _ = make_word_tokenizer(tmp_path_factory.mktemp("tok") / "tok", WORDS)
    return path


def _pairs(prefix):
    from megatron.training.data.indexed_writer import checked_indexed_dataset
    from megatron.training.data.preference_preprocess import preference_dataset_prefixes

    ids, masks = (checked_indexed_dataset(p) for p in preference_dataset_prefixes(prefix))
    return [[(ids[2 * k + s].tolist(), masks[2 * k + s].tolist()) for s in (0, 1)] for k in range(len(ids) // 2)]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_is_trls_collator_and_drops_what_trl_drops(tokenizer, tmp_path, capsys, mode):
    full = str(tmp_path / "full")
    assert _preprocess(tokenizer, full, RECORDS, seq_length=100) == 0
    examples = []
    for (chosen, chosen_mask), (rejected, _) in _pairs(full):
        start = chosen_mask.index(1)  # the shared prompt, then the response to its end
        examples.append({"prompt_ids": chosen[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]})
    assert any(len(e["prompt_ids"]) >= SEQ + 1 for e in examples)  # the case TRL's trainer drops (keep_start)
    assert sum(max(len(e["prompt_ids"]) + len(e[k]) for k in ("chosen_ids", "rejected_ids")) > SEQ + 1
               for e in examples) >= 3  # most pairs are cut

    trl = subprocess.run([sys.executable, "-c", TRL_COLLATOR], input=json.dumps([examples, SEQ + 1, mode]),
                         capture_output=True, text=True, check=True)
    theirs = [[tuple(side) for side in pair] for pair in json.loads(trl.stdout)]
    kept = [pair for pair, e in zip(theirs, examples)
            if not (mode == "keep_start" and len(e["prompt_ids"]) >= SEQ + 1)]  # TRL's filter

    from tools import preprocess_preference_data

    prefix = str(tmp_path / mode)
    assert _preprocess(tokenizer, prefix, RECORDS, seq_length=SEQ) == 2  # without the flag: refused
    capsys.readouterr()
    assert preprocess_preference_data.main(["--input", prefix + ".jsonl", "--output-prefix", prefix, "--seq-length",
                                            str(SEQ), "--truncation-mode", mode, "--tokenizer-type",
                                            "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]) == 0
    ours = [[(ids, mask) for ids, mask in pair] for pair in _pairs(prefix)]
    assert ours == [[(list(i), list(m)) for i, m in pair] for pair in kept]
    dropped = len(theirs) - len(kept)
    captured = capsys.readouterr()
    report = captured.out + captured.err
    assert f"dropped {dropped}" in report and (dropped == 1) == (mode == "keep_start")
