"""Fixtures for the distillation tests: a small jsonl corpus (the sample
corpus, no download) and a tiny random Llama teacher saved as a Hugging Face
directory with a byte-level BPE tokenizer trained on that corpus."""

import json
import os

import pytest

from megatron.training.data.sample_corpus import sample_documents, train_sample_hf_tokenizer

N_DOCS = 24


def write_docs(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(path, texts): N_DOCS documents with ids doc0, doc1, ... plus two very short ones."""
    docs = sample_documents()[:N_DOCS] + ["tiny", "short doc"]
    return write_docs(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs), docs


def build_tiny_llama(out, corpus_path, hidden_size=32, num_heads=4, num_kv_heads=2):
    """A random 2-layer Llama with a 300-token byte-level BPE trained on the corpus, saved as a HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    train_sample_hf_tokenizer(corpus_path, out, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(corpus, tmp_path_factory):
    return build_tiny_llama(str(tmp_path_factory.mktemp("teacher") / "tiny-llama"), corpus[0])

SAMPLING = dict(max_new_tokens=24, temperature=0.8, top_k=50, seed=7)


@pytest.fixture(scope="session")
def hf_teacher(teacher_dir):
    from megatron.training.distill.teacher import SamplingConfig, build_teacher

    return build_teacher("hf", teacher_dir, SamplingConfig(**SAMPLING))


def run_generation(corpus_path, teacher, out, prefix_length=16, log=None, **overrides):
    """generate_synthetic_data over the corpus; returns the run report."""
    from megatron.training.distill.documents import PrefixConfig, PrefixCutter, SourceStats, iter_jsonl_documents
    from megatron.training.distill.filters import FilterConfig
    from megatron.training.distill.generate import GenerateConfig, generate_synthetic_data

    stats = SourceStats()
    cfg = GenerateConfig(str(out), "tiny-llama", corpus_path, **dict(dict(batch_size=4, docs_per_shard=6,
                         log_interval_s=1e9, filters=FilterConfig(min_tokens=4)), **overrides))
    cutter = PrefixCutter(PrefixConfig("tokens", prefix_length), teacher.tokenizer, stats)
    return generate_synthetic_data(iter_jsonl_documents(corpus_path, stats), cutter, teacher, cfg,
                                   log=log or (lambda msg: None))


def read_shards(out):
    """Every record of the complete shards of an output folder, in shard order."""
    folder = os.path.join(str(out), "shards")
    records = []
    for name in sorted(os.listdir(folder)):
        assert ".tmp-" not in name, f"temporary shard {name} left behind"
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    return records


def manifest_ids(out):
    with open(os.path.join(str(out), "manifest.jsonl")) as f:
        return [i for line in f for i in json.loads(line)["ids"]]


@pytest.fixture(scope="session")
def generated(corpus, hf_teacher, tmp_path_factory):
    """(output folder, report) of one complete run over the corpus."""
    out = tmp_path_factory.mktemp("generated")
    return out, run_generation(corpus[0], hf_teacher, out)
