"""Shared fixtures for the data-tool tests: the sample corpus (Python's own
language reference, no download) and two tiny tokenizers trained on it."""

import json
import os

import pytest

from megatron.training.data.sample_corpus import (
    sample_documents, train_sample_hf_tokenizer, train_sample_tokenizer, write_sample_corpus,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(path, documents): ~250 documents of ~2 KB as {"id", "text"} jsonl."""
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    write_sample_corpus(path)
    return path, sample_documents()


@pytest.fixture(scope="session")
def sp_model(corpus, tmp_path_factory):
    return train_sample_tokenizer(corpus[0], str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=600)


@pytest.fixture(scope="session")
def hf_dir(corpus, tmp_path_factory):
    return train_sample_hf_tokenizer(corpus[0], str(tmp_path_factory.mktemp("hf") / "tok"), vocab_size=400)


def write_jsonl(path, records):
    """Write records (dicts are dumped as JSON, bytes/str written as they are) one per line."""
    with open(path, "wb") as f:
        for r in records:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(line + b"\n")
    return str(path)
