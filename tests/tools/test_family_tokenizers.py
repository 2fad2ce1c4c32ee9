"""The HF tokenizers Llama 3.x and Qwen2/2.5/3 ship (tiny copies built in
tests/family_tokenizers.py) through the data tool, the driver's vocabulary
and the converter's tokenizer check and export."""

import filecmp
import json
import os
from types import SimpleNamespace

import pytest

from megatron.training.tokenizer import build_tokenizer, model_vocabulary
from tests.family_tokenizers import TRICKY_TEXTS, make_llama3_tokenizer, make_qwen2_tokenizer
from tests.tools.conftest import write_jsonl

# The base models' tokenizers: eos ends a pretraining document.
BASES = {"llama3": lambda path: make_llama3_tokenizer(path, eos="<|end_of_text|>"),
         "qwen2.5": lambda path: make_qwen2_tokenizer(path, eos="<|endoftext|>")}
DOCUMENTS = [t for t in TRICKY_TEXTS if t]


@pytest.fixture(scope="module", params=sorted(BASES))
def base_tokenizer(request, tmp_path_factory):
    """(family, tokenizer directory, transformers' AutoTokenizer of it)."""
    from transformers import AutoTokenizer

    path = BASES[request.param](str(tmp_path_factory.mktemp(request.param)))
    return request.param, path, AutoTokenizer.from_pretrained(path)


def _documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_documents_begin_and_end_as_transformers_tokenizes_them(base_tokenizer, tmp_path):
    """--legacy-tokenizer: each document is AutoTokenizer's ids (Llama 3:
    <|begin_of_text|> first; Qwen: no BOS) then the end-of-document token
    (eos_token). Default (megatron-core's tokenizers, as Megatron-LM's
    preprocess_data.py): the same without the special tokens the tokenizer adds."""
    from tools.preprocess_data import main

    family, path, hf = base_tokenizer
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    eos = hf.convert_tokens_to_ids("<|end_of_text|>" if family == "llama3" else "<|endoftext|>")
    assert hf.eos_token_id == eos
    for legacy in (True, False):
        prefix = str(tmp_path / f"legacy{legacy}")
        flags = ["--legacy-tokenizer"] if legacy else []
        assert main(["--input", data, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", path, "--append-eod", "--workers", "1", *flags]) == 0
        expected = [hf(t, add_special_tokens=legacy).input_ids + [eos] for t in DOCUMENTS]
        assert _documents(prefix + "_text_document") == expected, (family, legacy)
    first = [doc[0] for doc in _documents(str(tmp_path / "legacyTrue_text_document"))]
    if family == "llama3":
        assert set(first) == {hf.convert_tokens_to_ids("<|begin_of_text|>")}
    else:
        assert hf.bos_token_id is None and first[0] == hf(DOCUMENTS[0], add_special_tokens=False).input_ids[0]
    # the driver and the data tools agree on the vocabulary and the end of a document
    for legacy in (True, False):
        tok = build_tokenizer("HuggingFaceTokenizer", path, legacy=legacy)
        assert (tok.vocab_size, tok.eod, tok.bos) == (len(hf), eos, hf.bos_token_id)


# (tokenizer tokens, what the checkpoint records) -> the model's vocabulary
VOCABULARIES = [
    # converted from an HF config whose vocab_size (400, recorded as --vocab-size) exceeds the tokenizer's 392
    # tokens, as Qwen2.5's does; in the torch format (unpadded_vocab_size recorded) or torch_dist
    ((392, {"vocab_size": 400, "unpadded_vocab_size": 400}), 400),
    ((392, {"vocab_size": 400}), 400),
    # trained by the driver: the tokenizer's (a --vocab-size that HuggingFaceTokenizer ignored changes nothing)
    ((392, {"unpadded_vocab_size": 392}), 392),
    ((392, {"vocab_size": 400, "unpadded_vocab_size": 392}), 392),
    ((1001, {"vocab_size": 1000, "unpadded_vocab_size": 1001}), 1001),  # NullTokenizer: --vocab-size ids + EOD
    # Llama 3: the tokenizer's 128,256 are the model's
    ((128256, {"vocab_size": 128256, "unpadded_vocab_size": 128256}), 128256),
]


@pytest.mark.parametrize("given,expected", VOCABULARIES)
def test_model_vocabulary(given, expected):
    assert model_vocabulary(*given) == expected


def test_driver_continues_a_model_with_more_rows_than_tokens(base_tokenizer, monkeypatch):
    """--use-checkpoint-args on a converted Qwen-style model (config vocab_size
    above the tokenizer's length): the model's vocabulary, padded for this run,
    not the tokenizer's; a checkpoint the driver trained with another
    tokenizer is still refused."""
    from megatron.training import training
    from megatron.training.errors import ArgumentError
    from megatron.training.sizes import padded_vocab_size

    family, path, hf = base_tokenizer
    args = SimpleNamespace(use_checkpoint_args=True, load="ckpt", ckpt_step=None, tokenizer_type="HuggingFaceTokenizer",
                           tokenizer_model=path, vocab_file=None, merge_file=None, vocab_size=len(hf) + 8,
                           make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    converted = {"padded_vocab_size": len(hf) + 8, "unpadded_vocab_size": len(hf) + 8, "vocab_size": len(hf) + 8,
                 "make_vocab_size_divisible_by": 8, "tensor_model_parallel_size": 1}
    monkeypatch.setattr(training.save_load, "read_checkpoint_args", lambda load, step=None: converted)
    notes = []
    monkeypatch.setattr(training, "print_rank_0", notes.append)
    training.build_tokenizer_from_args(args)
    assert (args.padded_vocab_size, args.unpadded_vocab_size) == (padded_vocab_size(len(hf) + 8, 128, 2), len(hf) + 8)
    assert notes and "padding rows are refitted on load" in notes[0]  # the model's rows, padded as this run pads

    trained = {"padded_vocab_size": 512, "unpadded_vocab_size": len(hf) + 8}  # by the driver, another tokenizer
    monkeypatch.setattr(training.save_load, "read_checkpoint_args", lambda load, step=None: trained)
    args.vocab_size = None
    with pytest.raises(ArgumentError, match=f"trained with another tokenizer: its vocabulary has {len(hf) + 8} "):
        training.build_tokenizer_from_args(args)


def test_conversion_accepts_a_tokenizer_smaller_than_the_embedding(base_tokenizer):
    from megatron.training.checkpoint_convert.core import ConversionError
    from megatron.training.checkpoint_convert.hf_tokenizer import check_tokenizer_vocab

    _, path, hf = base_tokenizer
    check_tokenizer_vocab(("HuggingFaceTokenizer", path), len(hf), "x")
    check_tokenizer_vocab(("HuggingFaceTokenizer", path), len(hf) + 271, "x")  # Qwen2.5-0.5B: 151,936 rows
    with pytest.raises(ConversionError, match=f"has {len(hf)} tokens but config.json vocab_size is {len(hf) - 1}"):
        check_tokenizer_vocab(("HuggingFaceTokenizer", path), len(hf) - 1, "x")


def test_export_keeps_the_tokenizer_files_as_shipped(tmp_path):
    """The HF export of a Llama 3.1 / Qwen2.5 Instruct tokenizer: its own
    tokenizer.json and tokenizer_config.json (chat template, added tokens,
    tokenizer_class), so transformers loads the same ids, special tokens and
    chat rendering."""
    from transformers import AutoTokenizer

    from megatron.training.checkpoint_convert.hf_tokenizer import export_tokenizer

    messages = [{"role": "user", "content": "Rate?"}, {"role": "assistant", "content": "held"}]
    for family, make in (("llama3.1", make_llama3_tokenizer), ("qwen2.5", make_qwen2_tokenizer)):
        source, out = make(str(tmp_path / family)), tmp_path / f"{family}-export"
        out.mkdir()
        special = export_tokenizer("HuggingFaceTokenizer", source, str(out))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert filecmp.cmp(os.path.join(source, name), out / name, shallow=False), (family, name)
        with open(out / "tokenizer_config.json") as f:
            assert "chat_template" in json.load(f)
        a, b = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(str(out))
        assert special["bos_token_id"] == a.bos_token_id and special["eos_token_id"] == a.eos_token_id
        assert [b(t).input_ids for t in TRICKY_TEXTS] == [a(t).input_ids for t in TRICKY_TEXTS]
        assert b.apply_chat_template(messages, tokenize=False) == a.apply_chat_template(messages, tokenize=False)
        assert (len(b), b.pad_token_id) == (len(a), a.pad_token_id)
    # a tokenizer.json file alone: a tokenizer_class every transformers version loads
    out = tmp_path / "file-export"
    out.mkdir()
    export_tokenizer("HuggingFaceTokenizer", os.path.join(source, "tokenizer.json"), str(out))
    with open(out / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(str(out))("<|im_start|>hi").input_ids == a("<|im_start|>hi").input_ids


def test_model_with_more_rows_than_tokens_round_trips_bitwise(tmp_path):
    """An HF model with 8 embedding rows beyond its tokenizer's tokens (as
    Qwen2.5's 152,064 for 151,665), with that tokenizer in its directory:
    HF -> Megatron at TP=2 -> HF (with --tokenizer-model, as finetune.py
    exports) gives back every row, bit for bit, and config.json's vocab_size."""
    from transformers import AutoConfig, AutoTokenizer

    from tests.tools.checkpoint.test_conversion import (
        assert_same_tensors, convert, make_hf_model, read_safetensors, to_megatron,
    )

    hf = make_qwen2_tokenizer(str(tmp_path / "hf"))
    rows = len(AutoTokenizer.from_pretrained(hf)) + 8
    make_hf_model(hf, vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    mg = to_megatron(hf, tmp_path / "mg", 2, 1)
    for flags in ([], ["--tokenizer-model", hf]):
        back = convert("megatron", "hf", mg, tmp_path / f"back{len(flags)}", *flags)
        assert_same_tensors(read_safetensors(hf), read_safetensors(back))
        assert AutoConfig.from_pretrained(back).vocab_size == rows
