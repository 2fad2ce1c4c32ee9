"""The SFT dataset: truncation policy, per-epoch shuffling, and the layout of
padded and packed samples (labels, loss mask, positions, attention)."""

import numpy as np
import pytest
import torch

from megatron.training.data.sft_dataset import SFTDataError, SFTDataset
from megatron.training.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft
from tests.sft.conftest import write_jsonl

SEQ = 16  # windows of 17 tokens


def make_data(tmp_path, records, name="d"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    prefix = str(tmp_path / name)
    preprocess_sft(SFTPreprocessConfig(input=path, output_prefix=prefix, tokenizer_type="NullTokenizer",
                                       vocab_size=100, chat_template="raw"), log=lambda m: None)
    return prefix


def nums(a, b):
    return " ".join(str(i) for i in range(a, b))


# NullTokenizer, raw template: ids are the numbers, then EOS = 100; prompt masked
RECORDS = [{"input": nums(1, 4), "target": nums(4, 6)},     # 6 tokens: 3 prompt, 2 response + EOS
           {"input": nums(10, 12), "target": nums(12, 15)},  # 6 tokens
           {"input": nums(20, 21), "target": nums(21, 24)},  # 5 tokens
           {"input": nums(30, 40), "target": nums(40, 50)},  # 21 tokens: over-long, response after token 10
           {"input": nums(50, 70), "target": nums(70, 72)}]  # 23 tokens: the prompt alone fills the window


def test_truncation_policy_is_counted_and_applied(tmp_path):
    prefix = make_data(tmp_path, RECORDS)
    ds = SFTDataset(prefix, SEQ, truncation="truncate", shuffle=False)
    assert (ds.stats.over_long, ds.stats.truncated, ds.stats.dropped) == (2, 1, 1)
    assert ds.kept.tolist() == [0, 1, 2, 3]
    sample = ds[3]  # truncated: the first 17 tokens, the response cut short
    assert sample["tokens"].tolist() == list(range(30, 46))
    assert sample["labels"].tolist() == list(range(31, 47))
    assert sample["loss_mask"].tolist() == [0.0] * 9 + [1.0] * 7
    assert "2 longer than 17 tokens" in ds.describe("train") and "1 truncated, 1 dropped" in ds.describe("train")

    dropped = SFTDataset(prefix, SEQ, truncation="drop", shuffle=False)
    assert (dropped.stats.truncated, dropped.stats.dropped) == (0, 2)
    assert dropped.kept.tolist() == [0, 1, 2]
    with pytest.raises(SFTDataError, match="raise --seq-length"):
        SFTDataset(prefix, 2, truncation="drop")


def test_padded_sample_masks_prompt_and_padding(tmp_path):
    ds = SFTDataset(make_data(tmp_path, RECORDS), SEQ, shuffle=False)
    s = ds[0]
    assert s["tokens"].tolist() == [1, 2, 3, 4, 5, 100] + [0] * 10
    assert s["labels"].tolist() == [2, 3, 4, 5, 100] + [0] * 11
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 1] + [0] * 11  # labels 4, 5, EOS
    assert s["position_ids"].tolist() == list(range(SEQ))
    assert "attention_mask" not in s  # causal attention


def test_packed_sample_resets_positions_and_blocks_attention(tmp_path):
    ds = SFTDataset(make_data(tmp_path, RECORDS), SEQ, packing=True, truncation="drop", shuffle=False)
    assert [ds.sample_examples(i).tolist() for i in range(len(ds))] == [[0, 1, 2]]  # 6 + 6 + 5 = 17 tokens
    s = ds[0]
    assert s["tokens"].tolist() == [1, 2, 3, 4, 5, 100, 10, 11, 12, 13, 14, 100, 20, 21, 22, 23]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    # label 10 (next example's first token) is masked even though the prompt mask would be 0 anyway;
    # the labels after it follow each example's own mask
    assert s["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    mask = s["attention_mask"][0]  # True = may not attend
    allowed = ~mask
    assert allowed[7].tolist() == [False] * 6 + [True, True] + [False] * 8  # example 2 sees only itself
    assert not allowed.triu(1).any()  # causal


def test_boundary_label_masked_when_next_example_starts_with_a_response(tmp_path):
    # an empty prompt: the example's first token is a response token; packed, it must
    # not be predicted from the previous example
    prefix = make_data(tmp_path, [{"input": "", "target": "1 2"}, {"input": "", "target": "3 4"}])
    s = SFTDataset(prefix, SEQ, packing=True, shuffle=False)[0]
    assert s["tokens"][:6].tolist() == [1, 2, 100, 3, 4, 100]
    assert s["loss_mask"][:5].tolist() == [1, 1, 0, 1, 1]  # labels 2, EOS | 3 (masked) | 4, EOS


def test_epochs_are_seeded_permutations(tmp_path):
    prefix = make_data(tmp_path, [{"input": str(i), "target": str(i + 1)} for i in range(1, 40)])
    a = SFTDataset(prefix, SEQ, num_samples=39 * 3, seed=7)
    b = SFTDataset(prefix, SEQ, num_samples=39 * 3, seed=7)
    order = [a.sample_examples(i)[0] for i in range(len(a))]
    assert order == [b.sample_examples(i)[0] for i in range(len(b))]  # deterministic (every rank, resume)
    epochs = [order[k * 39:(k + 1) * 39] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(39))  # each epoch sees every example once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled per epoch
    other = SFTDataset(prefix, SEQ, num_samples=39, seed=8)
    assert [other.sample_examples(i)[0] for i in range(39)] != epochs[0]
    assert a.epochs == pytest.approx(3.0)
    packed = SFTDataset(prefix, SEQ, num_samples=20, packing=True, seed=7)
    first = np.concatenate([packed.sample_examples(i) for i in range(packed.samples_in_epoch(0))])
    assert first.tolist() == epochs[0]  # packing keeps the shuffled order
    assert torch.is_tensor(packed[0]["attention_mask"])
