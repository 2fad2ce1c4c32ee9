"""Shared fixtures for the BERT-family tests: a small corpus (Python's own
language reference plus unlabeled sentences of the planted classification
task, as a domain corpus), a lower-case WordPiece vocabulary and a
RoBERTa-style byte-level BPE trained on it with the `tokenizers` library,
the corpus preprocessed into sentence-level indexed datasets, and tiny random
HF models with every LayerNorm perturbed. Nothing is downloaded."""

import pytest
import torch

from megatron.training.data.sample_corpus import (
    train_sample_roberta_tokenizer, train_sample_wordpiece, write_bert_sample_corpus,
)

# A tiny BERT for the driver runs: post-LN, exact GELU, vocabulary padded to 64 x TP.
TINY_BERT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--apply-residual-connection-post-layernorm", "--make-vocab-size-divisible-by", "64"]


@pytest.fixture(scope="session")
def bert_corpus(tmp_path_factory):
    """jsonl of ~120 reference documents and 100 documents of 6 planted sentences each."""
    path = str(tmp_path_factory.mktemp("bert_corpus") / "corpus.jsonl")
    write_bert_sample_corpus(path)
    return path


@pytest.fixture(scope="session")
def wordpiece_vocab(bert_corpus, tmp_path_factory):
    return train_sample_wordpiece(bert_corpus, str(tmp_path_factory.mktemp("wordpiece")), vocab_size=1000)


@pytest.fixture(scope="session")
def roberta_tokenizer(bert_corpus, tmp_path_factory):
    return train_sample_roberta_tokenizer(bert_corpus, str(tmp_path_factory.mktemp("roberta_tok")), vocab_size=600)


def preprocess(corpus, prefix, *tokenizer_flags):
    from tools import preprocess_data

    assert preprocess_data.main(["--input", corpus, "--output-prefix", prefix, "--split-sentences",
                                 "--workers", "1", "--log-interval", "0", *tokenizer_flags]) == 0
    return prefix + "_text_sentence"


@pytest.fixture(scope="session")
def wordpiece_data(bert_corpus, wordpiece_vocab, tmp_path_factory):
    """(data prefix, tokenizer flags) of the corpus under the WordPiece vocabulary."""
    flags = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", wordpiece_vocab]
    return preprocess(bert_corpus, str(tmp_path_factory.mktemp("wp_data") / "corpus"), *flags), flags


@pytest.fixture(scope="session")
def roberta_data(bert_corpus, roberta_tokenizer, tmp_path_factory):
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", roberta_tokenizer]
    return preprocess(bert_corpus, str(tmp_path_factory.mktemp("rob_data") / "corpus"), *flags), flags


# ------------------------------------------------------------------ tiny HF models

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
HF_MODELS = {
    # name: (config class, model class, config)
    "bert_pretraining": ("BertConfig", "BertForPreTraining", dict(TINY, vocab_size=200, max_position_embeddings=40)),
    "roberta_mlm": ("RobertaConfig", "RobertaForMaskedLM",
                    dict(TINY, vocab_size=200, max_position_embeddings=42, pad_token_id=1, type_vocab_size=1,
                         layer_norm_eps=1e-5)),
    "megatron_bert_pretraining": ("MegatronBertConfig", "MegatronBertForPreTraining",
                                  dict(TINY, vocab_size=200, max_position_embeddings=40)),
    "bert_classifier": ("BertConfig", "BertForSequenceClassification",
                        dict(TINY, vocab_size=200, max_position_embeddings=40, num_labels=3)),
    "roberta_classifier": ("RobertaConfig", "RobertaForSequenceClassification",
                           dict(TINY, vocab_size=200, max_position_embeddings=42, pad_token_id=1, type_vocab_size=1,
                                num_labels=3, layer_norm_eps=1e-5)),
    "bert_encoder": ("BertConfig", "BertModel", dict(TINY, vocab_size=200, max_position_embeddings=40)),
}


def make_hf_model(path, name, seed=0, **overrides):
    """A random HF model of HF_MODELS[name] with every LayerNorm (and bias)
    perturbed, so a LayerNorm mapped to the wrong place shows in the outputs."""
    import transformers

    config_class, model_class, config = HF_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**dict(config, **overrides)))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname or "layer_norm" in pname or ".ln." in pname:
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.uniform_(-0.5, 0.5)
            elif pname.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    model.save_pretrained(str(path))
    return str(path)


def convert(loader, saver, load, save, *extra):
    from tools.checkpoint import util

    rc = util.main(["--model-type", "BERT", "--loader", loader, "--saver", saver, "--load-dir", str(load),
                    "--save-dir", str(save), *map(str, extra)])
    assert rc == 0
    return str(save)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bert")
    return {name: make_hf_model(root / name, name, seed=i) for i, name in enumerate(HF_MODELS)}


