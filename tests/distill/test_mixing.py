"""Mixing: the synthetic shards become an indexed dataset with the data tools,
and the blend weights give the requested synthetic share of the tokens that
the training driver's dataset (megatron-core's BlendedDataset built by
megatron/training/data/pretrain.py) actually samples."""

import collections
import contextlib
import io
import os
import types

import pytest

from megatron.training.data.preprocess import PreprocessConfig, preprocess
from megatron.training.distill.mixing import (
    BlendError, format_data_path, indexed_token_count, parse_data_path, preprocess_synthetic, synthetic_blend,
)
from tests.distill.conftest import write_docs


@pytest.fixture(scope="module")
def datasets(corpus, teacher_dir, generated, tmp_path_factory):
    """(original prefixes, synthetic prefix, tokens written per prefix), all with the teacher's tokenizer."""
    folder = tmp_path_factory.mktemp("mix")
    originals, written = [], {}
    for name, docs in (("a", corpus[1][:8]), ("b", corpus[1][8:24])):  # sizes differ about 1:2
        cfg = PreprocessConfig(input=write_docs(folder / f"{name}.jsonl", docs), output_prefix=str(folder / name),
                               tokenizer_type="HuggingFaceTokenizer", tokenizer_model=teacher_dir, append_eod=True)
        written[cfg.output_name("text")] = preprocess(cfg, log=lambda m: None).tokens
        originals.append(cfg.output_name("text"))
    synthetic = preprocess_synthetic(str(generated[0]), str(folder / "synth"), "HuggingFaceTokenizer", teacher_dir)
    return originals, synthetic, written


def test_token_counts_come_from_the_idx(datasets):
    originals, _, written = datasets
    assert [indexed_token_count(p) for p in originals] == [written[p] for p in originals]


def test_synthetic_dataset_holds_the_shard_texts(datasets, generated, teacher_dir):
    from megatron.training.tokenizer import build_tokenizer
    from tests.distill.conftest import read_shards

    tok = build_tokenizer("HuggingFaceTokenizer", teacher_dir)
    expected = sum(len(tok.tokenize(r["text"])) + 1 for r in read_shards(generated[0]))  # + end of document
    assert indexed_token_count(datasets[1]) == expected


def _sampled_tokens(data_path, teacher_dir, samples):
    """Tokens drawn from each dataset prefix by the first `samples` samples of the driver's training dataset."""
    from megatron.training.data.pretrain import build_pretraining_datasets
    from megatron.training.tokenizer import build_tokenizer

    args = types.SimpleNamespace(
        seed=1234, seq_length=32, data_path=data_path.split(), split="100,0,0", data_cache_path=None,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, vocab_size=None, mock_data=False,
        train_iters=samples // 8, train_samples=None, global_batch_size=8, eval_interval=None, eval_iters=0)
    train, valid, test = build_pretraining_datasets(args, build_tokenizer("HuggingFaceTokenizer", teacher_dir))
    assert valid is None and test is None and len(train) >= samples
    counts = collections.Counter()
    for i in range(samples):  # what the training loop reads
        prefix = train.datasets[train.dataset_index[i]].dataset_path
        counts[prefix] += len(train[i]["tokens"])
    return counts


@pytest.mark.parametrize("fraction", [0.005, 0.1])
def test_blend_gives_the_requested_synthetic_share_of_sampled_tokens(datasets, teacher_dir, fraction):
    originals, synthetic, written = datasets
    entries = synthetic_blend(originals, [synthetic], fraction)
    counts = _sampled_tokens(format_data_path(entries), teacher_dir, samples=4000)
    total = sum(counts.values())
    assert abs(counts[synthetic] / total - fraction) <= 1 / 4000  # one sample of 4000
    # the original share is split by the token counts of the .idx files
    a, b = originals
    assert abs(counts[a] / (counts[a] + counts[b]) - written[a] / (written[a] + written[b])) < 0.005


def test_given_original_weights_are_kept_in_proportion(datasets):
    (a, b), synthetic, _ = datasets
    entries = synthetic_blend([f"3 {a} 1 {b}"], [synthetic], 0.2)
    assert [round(e.weight, 9) for e in entries] == [0.6, 0.2, 0.2]


def test_blend_errors_name_the_fix(datasets):
    with pytest.raises(BlendError, match="0.005 for 0.5%"):
        synthetic_blend(datasets[0], [datasets[1]], 5)
    with pytest.raises(BlendError, match="alternate weights and prefixes"):
        parse_data_path(["0.5", "a", "b"])


def test_tool_prints_the_data_path(datasets):
    import tools.build_synthetic_blend as tool

    originals, synthetic, _ = datasets
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool.main(["--original-data-path", *originals, "--synthetic-data-path", synthetic,
                        "--synthetic-fraction", "0.005", "--train-tokens", "1e6"])
    assert rc == 0
    assert out.getvalue().strip() == format_data_path(synthetic_blend(originals, [synthetic], 0.005))
    assert "epochs" in err.getvalue() and os.path.basename(synthetic) in err.getvalue()
