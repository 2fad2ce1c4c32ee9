"""tools/preprocess_data.py: round trips through megatron-core's readers, its
flags, bad input, and interrupted runs."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.tokenizer import build_tokenizer
from tests.tools.conftest import REPO, write_jsonl
from tools.preprocess_data import main as preprocess_main

TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def run(*args):
    return preprocess_main([str(a) for a in args])


def docs_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], ds


def test_round_trip_indexed_dataset_sentencepiece(corpus, sp_model, tmp_path):
    path, docs = corpus
    assert run("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", "Llama2Tokenizer",
               "--tokenizer-model", sp_model, "--append-eod", "--workers", 2) == 0
    got, ds = docs_of(str(tmp_path / "o_text_document"))
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    assert ds.index.dtype == np.uint16
    assert got == [tok.tokenize(d) + [tok.eod] for d in docs]
    # sentencepiece's normalizer folds runs of whitespace; everything else comes back
    assert tok.detokenize(got[3][:-1]).split() == docs[3].split()


def test_round_trip_gpt_dataset_hf(corpus, hf_dir, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    path, docs = corpus
    run("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", hf_dir, "--append-eod", "--workers", 1)
    prefix = str(tmp_path / "o_text_document")
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir, legacy=False)
    expected = [tok.tokenize(d) + [tok.eod] for d in docs]
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == expected

    class Tok:  # what GPTDataset needs of a tokenizer
        eod, pad, vocab_size = tok.eod, -1, tok.vocab_size
        unique_identifiers = {"class": "test"}

    config = GPTDatasetConfig(random_seed=1, sequence_length=64, split="1,0,0", tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=str(tmp_path / "cache"))
    gpt = GPTDataset(ds, prefix, np.arange(len(ds), dtype=np.int32), None, Split.train, config)
    # every sample is a window of the documents concatenated in the dataset's own order
    stream = np.concatenate([np.array(expected[d], np.int64) for d in gpt.document_index]).astype(np.uint16).tobytes()
    for i in range(0, len(gpt), 7):
        s = gpt[i]
        window = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]]).astype(np.uint16).tobytes()
        pos = stream.find(window)
        while pos % 2:  # only token-aligned matches count
            pos = stream.find(window, pos + 1)
        assert pos >= 0, f"sample {i} is not a window of the documents"
    assert len(gpt) >= sum(map(len, expected)) // 65 - 1


def test_split_sentences_and_keep_newlines(sp_model, tmp_path):
    text = "The first sentence. The second one!\nA third? Yes, Dr. Smith said so."
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": text}])
    run("--input", inp, "--output-prefix", tmp_path / "s", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", sp_model, "--split-sentences", "--workers", 1)
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    tok = build_tokenizer("SentencePieceTokenizer", sp_model, legacy=False)
    assert [tok.detokenize(ds[i].tolist()) for i in range(len(ds))] == [
        "The first sentence.", "The second one!", "A third?", "Yes, Dr. Smith said so."]
    assert len(ds.document_indices) == 2 and ds.document_indices[-1] == 4  # one document, four sequences
    run("--input", inp, "--output-prefix", tmp_path / "k", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", sp_model, "--split-sentences", "--keep-newlines", "--workers", 1)
    assert len(IndexedDataset(str(tmp_path / "k_text_sentence"))) == 4


def test_builtin_splitter_keeps_newlines_when_asked():
    from megatron.training.data.sentence_split import regex_split

    text = "One. Two!\n\nThree? See e.g. the U.S. Navy.  Four."
    assert regex_split(text) == ["One.", "Two!", "Three?", "See e.g. the U.S. Navy.", "Four."]
    kept = regex_split(text, keep_newlines=True)
    assert "".join(kept) == text and kept[1] == "Two!\n\n"


def test_several_json_keys_and_gzip(sp_model, tmp_path):
    recs = [{"text": f"body number {i}", "summary": f"short {i}"} for i in range(30)]
    inp = str(tmp_path / "in.jsonl.gz")
    with gzip.open(inp, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    run("--input", inp, "--output-prefix", tmp_path / "m", "--json-keys", "text", "summary",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model, "--workers", 2)
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    for key in ("text", "summary"):
        got, _ = docs_of(str(tmp_path / f"m_{key}_document"))
        assert got == [tok.tokenize(r[key]) for r in recs]


def test_title_content_format(sp_model, tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"title": "Headline", "content": "Body text."}])
    run("--input", inp, "--output-prefix", tmp_path / "p", "--json-format", "title_content",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model, "--workers", 1)
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    assert docs_of(str(tmp_path / "p_text_document"))[0] == [tok.tokenize("Headline\nBody text.")]


def test_partitions_order_like_megatron_lm(corpus, sp_model, tmp_path):
    """Line i goes to partition i mod N; partitions are concatenated."""
    path, docs = corpus
    run("--input", path, "--output-prefix", tmp_path / "p", "--tokenizer-type", "Llama2Tokenizer",
        "--tokenizer-model", sp_model, "--workers", 2, "--partitions", 3)
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    order = [i for p in range(3) for i in range(p, len(docs), 3)]
    assert docs_of(str(tmp_path / "p_text_document"))[0] == [tok.tokenize(docs[i]) for i in order]
    assert sorted(os.listdir(tmp_path)) == ["p_text_document.bin", "p_text_document.idx"]


def test_bad_input_counted_and_strict(sp_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "good one"}, b"{not json", {"other": "x"}, {"text": ""}, b'{"text": "caf\xe9"}',
        {"text": 5}, b"", {"text": "good two"}])
    assert run("--input", inp, "--output-prefix", tmp_path / "b", "--tokenizer-type", "Llama2Tokenizer",
               "--tokenizer-model", sp_model, "--workers", 1) == 0
    err = capsys.readouterr().err
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    assert docs_of(str(tmp_path / "b_text_document"))[0] == [tok.tokenize("good one"), tok.tokenize("good two")]
    assert "skipped lines 6 of 8" in err
    for reason, line in (("not_json", 2), ("missing_key", 3), ("empty", 4), ("invalid_utf8", 5), ("not_text", 6)):
        assert f"{inp}:{line}" in err and reason in err
    assert run("--input", inp, "--output-prefix", tmp_path / "strict", "--tokenizer-type", "Llama2Tokenizer",
               "--tokenizer-model", sp_model, "--workers", 1, "--strict") == 2
    assert f"{inp}:2" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("strict")]


def test_interrupted_run_leaves_no_final_files(corpus, sp_model, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(corpus[0], "rb") as f:
        data = f.read()
    with open(big, "wb") as f:
        for _ in range(60):
            f.write(data)
    proc = subprocess.Popen([sys.executable, TOOL, "--input", str(big), "--output-prefix", str(tmp_path / "o"),
                             "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model,
                             "--workers", "1", "--log-interval", "100"],
                            stderr=subprocess.PIPE, text=True)
    assert "Processed" in proc.stderr.readline()  # it is mid-run
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == ["big.jsonl"]  # SIGTERM: partial files removed
    proc = subprocess.Popen([sys.executable, TOOL, "--input", str(big), "--output-prefix", str(tmp_path / "o"),
                             "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model,
                             "--workers", "1", "--log-interval", "100"],
                            stderr=subprocess.PIPE, text=True)
    assert "Processed" in proc.stderr.readline()
    proc.kill()  # SIGKILL: no cleanup possible, but nothing carries a final name
    proc.wait(timeout=30)
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".bin", ".idx"))]


def test_startup_is_fast_and_imports_no_torch(tmp_path, sp_model):
    inp = write_jsonl(tmp_path / "one.jsonl", [{"text": "hello"}])
    code = ("import sys, runpy; sys.argv = ['preprocess_data.py', '--input', %r, '--output-prefix', %r, "
            "'--tokenizer-type', 'Llama2Tokenizer', '--tokenizer-model', %r, '--workers', '1'];"
            "sys.path.insert(0, %r)\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'megatron.core' in sys.modules)"
            ) % (str(inp), str(tmp_path / "o"), sp_model, REPO, TOOL)
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # no torch or megatron.core import is what keeps start-up short (~0.3 s idle); the bound is generous for a
    # loaded CI machine and catches only a start-up that imports the world
    assert time.time() - t < 15.0
    assert out.stdout.split() == ["False", "False"]


def test_tokenizer_fast_path_matches_transformers(corpus, hf_dir):
    from transformers import AutoTokenizer

    texts = corpus[1][:20]
    ref = AutoTokenizer.from_pretrained(hf_dir)
    fast = build_tokenizer("HuggingFaceTokenizer", hf_dir, legacy=False)
    assert fast._fast is not None and fast.vocab_size == len(ref) and fast.eod == ref.eos_token_id
    assert fast.tokenize_batch(texts) == [ref(t, add_special_tokens=False).input_ids for t in texts]
    legacy = build_tokenizer("HuggingFaceTokenizer", hf_dir, legacy=True)
    assert legacy.tokenize_batch(texts) == [ref(t).input_ids for t in texts]


@pytest.fixture(scope="module")
def gpt2_files(corpus, tmp_path_factory):
    """A GPT-2-format vocab.json + merges.txt (byte-level BPE with <|endoftext|>) trained on the corpus."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus[0]], vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    return str(out / "vocab.json"), str(out / "merges.txt")


def test_gpt2_bpe_files_tokenize_as_transformers_gpt2(corpus, gpt2_files, tmp_path):
    """--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file: the ids of transformers'
    pure-Python GPT2Tokenizer (an independent implementation), then <|endoftext|>."""
    from transformers import GPT2Tokenizer

    path, docs = corpus
    vocab, merges = gpt2_files
    assert run("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", "GPT2BPETokenizer",
               "--vocab-file", vocab, "--merge-file", merges, "--append-eod", "--workers", 2) == 0
    got, ds = docs_of(str(tmp_path / "o_text_document"))
    reference = GPT2Tokenizer(vocab, merges)
    eod = reference.convert_tokens_to_ids("<|endoftext|>")
    assert ds.index.dtype == np.uint16 and len(got) == len(docs)
    assert got == [reference.encode(d) + [eod] for d in docs]


@pytest.mark.parametrize("vocab,dtype", [(80000, np.int32), (60000, np.uint16)])
def test_null_tokenizer_reads_ids_and_picks_the_dtype(tmp_path, vocab, dtype):
    """NullTokenizer: texts are space-separated ids, eod is --vocab-size, and from 65,500
    ids on the data is int32 (Megatron-LM's rule)."""
    write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "59999 5"}])
    assert run("--input", tmp_path / "ids.jsonl", "--output-prefix", tmp_path / "n", "--tokenizer-type",
               "NullTokenizer", "--vocab-size", vocab, "--append-eod", "--workers", 1) == 0
    got, ds = docs_of(str(tmp_path / "n_text_document"))
    assert ds.index.dtype == dtype
    assert got == [[1, 2, 3, vocab], [59999, 5, vocab]]
