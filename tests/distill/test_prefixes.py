"""Prompts are cut from documents as specified: by the teacher's tokens or by
characters, after a minimum document length, with or without BOS."""

import json

import pytest

from megatron.training.distill.documents import (
    Document, PrefixConfig, PrefixCutter, SourceStats, iter_jsonl_documents,
)
from megatron.training.data.jsonl_reader import InputError


@pytest.fixture(scope="module")
def tok(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


def test_token_prefix_is_the_first_n_teacher_tokens(corpus, tok):
    stats = SourceStats()
    cutter = PrefixCutter(PrefixConfig("tokens", 20, min_doc_length=30), tok, stats)
    prompts = [cutter.cut(d) for d in iter_jsonl_documents(corpus[0], stats)]
    kept = [p for p in prompts if p is not None]
    assert len(kept) == len(corpus[1]) - 2 and stats.skipped == {"short_document": 2}
    for p, text in zip(kept, corpus[1]):
        ids = tok(text, add_special_tokens=False).input_ids
        assert p.token_ids == [tok.bos_token_id] + ids[:20]
        assert p.prefix_tokens == 20
        assert p.prefix == tok.decode(ids[:20]) and text.startswith(p.prefix)


def test_min_doc_length_counts_teacher_tokens(tok):
    text = "alpha beta gamma delta epsilon"
    n = len(tok(text, add_special_tokens=False).input_ids)
    stats = SourceStats()
    assert PrefixCutter(PrefixConfig("tokens", 2, min_doc_length=n), tok, stats).cut(Document("a", text))
    assert PrefixCutter(PrefixConfig("tokens", 2, min_doc_length=n + 1), tok, stats).cut(Document("a", text)) is None
    assert stats.skipped == {"short_document": 1}


def test_char_prefix_and_no_bos(tok):
    stats = SourceStats()
    cutter = PrefixCutter(PrefixConfig("chars", 11, min_doc_length=15, add_bos=False), tok, stats)
    p = cutter.cut(Document("x", "Hello world, this is a document."))
    assert p.prefix == "Hello world" and p.token_ids == tok("Hello world", add_special_tokens=False).input_ids
    assert cutter.cut(Document("y", "Hello world!")) is None  # 12 < 15 characters


def test_min_doc_length_below_prefix_is_an_error():
    with pytest.raises(ValueError, match="raise --min-doc-length"):
        PrefixConfig("tokens", 64, min_doc_length=10)


def test_ids_from_the_record_else_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": 5, "text": "a"}) + "\nnot json\n" + json.dumps({"text": "b"}) + "\n")
    stats = SourceStats()
    assert [d.id for d in iter_jsonl_documents(str(path), stats)] == ["5", "d.jsonl:3"]
    assert stats.skipped == {"not_json": 1}


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": 1, "text": t}) + "\n" for t in "ab"))
    with pytest.raises(InputError, match="--id-key ''"):
        list(iter_jsonl_documents(str(path), SourceStats()))


def test_indexed_dataset_documents_come_back_as_text(corpus, teacher_dir, tmp_path):
    from megatron.training.data.preprocess import PreprocessConfig, preprocess
    from megatron.training.distill.documents import iter_indexed_documents
    from megatron.training.tokenizer import build_tokenizer

    cfg = PreprocessConfig(input=corpus[0], output_prefix=str(tmp_path / "c"), tokenizer_type="HuggingFaceTokenizer",
                           tokenizer_model=teacher_dir, append_eod=True)
    preprocess(cfg, log=lambda m: None)
    docs = list(iter_indexed_documents(cfg.output_name("text"), build_tokenizer("HuggingFaceTokenizer", teacher_dir)))
    assert [d.id for d in docs] == [str(i) for i in range(len(corpus[1]))]
    assert [d.text for d in docs] == corpus[1]  # byte-level BPE round-trips exactly, EOD dropped
