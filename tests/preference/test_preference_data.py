"""Preference records -> pair datasets: TRL's {prompt, chosen, rejected},
LLaMA-Factory's {instruction, input, history, chosen, rejected} and chat
message lists (explicit or implicit prompt) become pairs whose sides are the
SFT encoding of the same conversation with each response (the tokenizer's
own chat template), share the prompt's ids, and train on the final response
only; bad records stop the tool with one line naming file:line, and nothing
is written."""

import glob
import os

import numpy as np
import pytest

from tests.sft.conftest import make_word_tokenizer, write_jsonl

WORDS = ["a", "b", "c", "d", "e", "f", "sys", "ok", "no"]
USER = lambda text: {"role": "user", "content": text}  # noqa: E731
BOT = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path, vocab = make_word_tokenizer(tmp_path_factory.mktemp("tok") / "tok", WORDS)
    return path, {i: w for w, i in vocab.items()}


def _preprocess(tokenizer, path, records, seq_length=40):
    from tools import preprocess_preference_data

    write_jsonl(path + ".jsonl", records)
    return preprocess_preference_data.main(["--input", path + ".jsonl", "--output-prefix", path, "--seq-length",
                                            str(seq_length), "--tokenizer-type", "HuggingFaceTokenizer",
                                            "--tokenizer-model", tokenizer])


RECORDS = [
    ({"prompt": "a b", "chosen": "ok", "rejected": "no c"}, [USER("a b")], "ok", "no c"),
    ({"instruction": "a", "input": "b", "system": "sys", "history": [["c", "d"]], "chosen": "ok e", "rejected": "f"},
     [{"role": "system", "content": "sys"}, USER("c"), BOT("d"), USER("a\nb")], "ok e", "f"),
    ({"prompt": [USER("e")], "chosen": [BOT("ok")], "rejected": [BOT("no")]}, [USER("e")], "ok", "no"),
    ({"chosen": [USER("f"), BOT("a"), USER("b"), BOT("ok")], "rejected": [USER("f"), BOT("a"), USER("b"), BOT("no")]},
     [USER("f"), BOT("a"), USER("b")], "ok", "no"),
]


def test_every_format_becomes_a_pair_with_the_sft_encoding_and_the_last_response_masked(tokenizer, tmp_path):
    from megatron.training.data.indexed_writer import checked_indexed_dataset
    from megatron.training.data.preference_preprocess import preference_dataset_prefixes
    from megatron.training.data.sft_formats import record_to_conversation
    from megatron.training.data.sft_templates import SFTEncoder
    from megatron.training.tokenizer import build_tokenizer

    path, words = tokenizer
    prefix = str(tmp_path / "pairs")
    assert _preprocess(path, prefix, [r for r, *_ in RECORDS]) == 0
    ids_prefix, mask_prefix = preference_dataset_prefixes(prefix)
    ids, masks = checked_indexed_dataset(ids_prefix), checked_indexed_dataset(mask_prefix)
    assert list(ids.document_indices) == [0, 2, 4, 6, 8]  # one document of two sequences per pair
    encoder = SFTEncoder(build_tokenizer("HuggingFaceTokenizer", path, legacy=False))
    for k, (_, prompt, chosen, rejected) in enumerate(RECORDS):
        for side, response in ((0, chosen), (1, rejected)):
            got, mask = ids[2 * k + side].tolist(), masks[2 * k + side].tolist()
            want, _ = encoder.encode(record_to_conversation({"messages": prompt + [BOT(response)]}, "chat"))
            assert got == want, (k, side)  # the SFT encoding of the same conversation
            start = mask.index(1)
            assert set(mask[start:]) == {1} and not any(mask[:start])  # only the final response trains
            assert [words[i] for i in got[start:]] == response.split() + ["<|end|>"]
        assert ids[2 * k].tolist()[:start] == ids[2 * k + 1].tolist()[:start]  # one shared prompt


BAD = [
    ({"prompt": "a", "chosen": "b"}, "needs both 'chosen' and 'rejected'"),
    ({"prompt": "a", "chosen": "b c", "rejected": "b c"}, "chosen and rejected are identical"),
    ({"instruction": "a", "chosen": "b", "rejected": "  "}, "response is empty"),
    ({"prompt": "a " * 30, "chosen": "b", "rejected": "c"}, "does not fit --seq-length"),
    ({"chosen": [USER("a"), BOT("b")], "rejected": [USER("c"), BOT("d")]}, "same but for their last"),
    ({"prompt": "a", "chosen": [BOT("b")], "rejected": "c"}, "both be strings or both be message lists"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m.split()[-1] for _, m in BAD])
def test_bad_record_is_one_line_naming_file_and_line_and_nothing_is_written(tokenizer, tmp_path, capsys, record,
                                                                            message):
    prefix = str(tmp_path / "pairs")
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    assert _preprocess(tokenizer[0], prefix, [good, good, record, good], seq_length=16) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the start-up line (the template used), then the error
    errors = [line for line in err if line.startswith("error")]
    assert errors == err[-1:] and err[-1].startswith(f"error: {prefix}.jsonl:3: ") and message in err[-1], err
    assert not glob.glob(prefix + "_*"), os.listdir(tmp_path)  # nothing half-written


def test_dataset_sample_layout_and_a_shorter_seq_length_is_refused(tokenizer, tmp_path):
    from megatron.training.data.preference_dataset import PreferenceDataError, PreferenceDataset, split_pair_batch

    prefix = str(tmp_path / "pairs")
    assert _preprocess(tokenizer[0], prefix, [r for r, *_ in RECORDS], seq_length=20) == 0
    ds = PreferenceDataset(prefix, 20, shuffle=False)
    s = ds[1]
    assert s["tokens"].shape == (2, 20) and np.array_equal(s["labels"][:, :-1], s["tokens"][:, 1:])
    n = int(ds.lengths[1, 0])
    assert s["loss_mask"][0, n - 1:].sum() == 0 and s["loss_mask"][0, n - 2] == 1  # the last label is EOS
    import torch

    tokens, _, mask, _, ref = split_pair_batch(torch.utils.data.default_collate([ds[0], ds[1]]), "cpu")
    assert torch.equal(tokens[1], ds[1]["tokens"][0]) and torch.equal(tokens[2], ds[0]["tokens"][1]) and ref is None
    with pytest.raises(PreferenceDataError, match="do not fit --seq-length 8"):
        PreferenceDataset(prefix, 8)
