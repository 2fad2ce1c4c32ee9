"""Masked-LM data: the WordPiece tokenizer against transformers' pure-Python
BertTokenizer, sentence-split preprocessing, and the masking of the BERT
dataset (megatron-core's, with the pad-id, word-start and count fixes) over
2,000 samples each of a WordPiece ("##") and a byte-level BPE ("Ġ", pad id 1)
corpus: 15% masked, 80/10/10 replacement, no special token masked, whole
words masked together, deterministic per sample index, new masks in a new
epoch, padding mask 0 at pads; and its errors and report of dropped documents.
"""

import json
import os

import numpy as np
import pytest

from megatron.training.bert.arguments import add_bert_args
from tests.bert.conftest import preprocess

SAMPLES = 2000


@pytest.fixture(scope="module")
def process_group():
    """megatron-core's dataset builder asks torch.distributed for its rank: a
    group of one in this process, removed afterwards (later tests fork)."""
    import torch.distributed as dist

    from tests.distributed.launcher import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    if created:
        dist.destroy_process_group()


def bert_args(data_prefix, tokenizer_flags, cache, seq=128, samples=SAMPLES, *extra):
    from megatron.training.arguments import parse_args
    from megatron.training.bert.arguments import finalize_bert_args

    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--seq-length", str(seq), "--micro-batch-size", "1", "--global-batch-size", "1",
                       "--lr", "1", "--train-iters", str(samples), "--data-path", data_prefix, "--split", "100,0,0",
                       "--eval-iters", "0", "--data-cache-path", str(cache), *tokenizer_flags, *extra], add_bert_args)
    finalize_bert_args(args)
    return args


def build(args, log=None):
    from megatron.training.data.bert_dataset import build_bert_datasets
    from megatron.training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file)
    train, _, _ = build_bert_datasets(args, tokenizer, log=log or (lambda msg: None))
    return train, tokenizer


# ------------------------------------------------------------------ tokenizer and preprocessing

def test_wordpiece_tokenizer_matches_transformers(bert_corpus, wordpiece_vocab):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from megatron.training.tokenizer import build_tokenizer

    with open(bert_corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:3000] for line in f][:20]
    texts += ["Café, naïve façade — 東京 Ünïcode!", "UPPER lower MiXeD 3.14 $5", "\tTabs\nand  spaces  "]
    for kind, lower in (("BertWordPieceLowerCase", True), ("BertWordPieceCase", False)):
        ours = build_tokenizer(kind, vocab_file=wordpiece_vocab)
        reference = BertTokenizerLegacy(wordpiece_vocab, do_lower_case=lower)
        assert ours.vocab_size == len(reference) == 1000
        for text in texts:
            assert ours.tokenize(text) == reference(text, add_special_tokens=False).input_ids, (kind, text[:60])
        assert (ours.cls, ours.sep, ours.pad, ours.mask) == tuple(
            reference.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[MASK]"]))


def test_an_hf_bert_tokenizer_directory_matches_the_vocab_file(bert_corpus, wordpiece_vocab, tmp_path):
    """bert-base-uncased's HF directory form (tokenizer.json) through HuggingFaceTokenizer: the same
    ids as BertWordPieceLowerCase in preprocessing (no special token added) and the same special ids
    and vocabulary for the masked-LM dataset."""
    from transformers import BertTokenizerFast

    from megatron.training.tokenizer import build_tokenizer

    BertTokenizerFast(wordpiece_vocab, do_lower_case=True).save_pretrained(str(tmp_path / "hf"))
    word_piece = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    for legacy in (False, True):
        hf = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"), legacy=legacy)
        assert (hf.cls, hf.sep, hf.mask, hf.pad) == (word_piece.cls, word_piece.sep, word_piece.mask, word_piece.pad)
        assert hf.inv_vocab == word_piece.inv_vocab
    hf = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"), legacy=False)  # preprocess_data's default
    with open(bert_corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:2000] for line in f][:10]
    assert hf.tokenize_batch(texts) == word_piece.tokenize_batch(texts)


def test_split_sentences_gives_one_sequence_per_sentence(wordpiece_data, wordpiece_vocab):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron.training.tokenizer import build_tokenizer

    prefix, _ = wordpiece_data
    data = IndexedDataset(prefix)
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    docs = data.document_indices
    assert len(data) > 3 * (len(docs) - 1)  # several sentences per document
    first = [tok.detokenize(data[i].tolist()) for i in range(docs[0], docs[1])]
    assert all(s.rstrip().endswith((".", ":", "?", "!")) for s in first[:-1]), first[:3]
    specials = {tok.cls, tok.sep, tok.pad, tok.mask}
    assert not specials & set(np.concatenate([data[i] for i in range(50)]).tolist())  # no [CLS]/[SEP] added


# ------------------------------------------------------------------ masking

def original_tokens(sample):
    return np.where(sample["loss_mask"] == 1, sample["labels"], sample["text"])


def sentence_starts(ds, idx, tokens, specials):
    """Positions of `tokens` (a sample's original ids) that begin a sentence
    of the indexed dataset: each segment between special tokens is found in
    the concatenated sentences the sample was drawn from."""
    beg, end, _ = ds.sample_index[idx]
    concat, starts = [], set()
    for i in range(beg, end):
        starts.add(len(concat))
        concat += np.asarray(ds.dataset._dataset[i]).tolist()
    found, p = set(), 0
    while p < len(tokens):
        if tokens[p] in specials:
            p += 1
            continue
        q = p
        while q < len(tokens) and tokens[q] not in specials:
            q += 1
        segment = list(tokens[p:q])
        offset = next(o for o in range(len(concat) - len(segment) + 1) if concat[o:o + len(segment)] == segment)
        found |= {p + k for k in range(len(segment)) if offset + k in starts}
        p = q
    return found


def words(tokens, inv_vocab, convention, specials, sentence_first):
    """Word index per position by the vocabulary's own convention: "##"
    continues a word; "Ġ" starts one; so does a special token, the piece after
    one and the first piece of a sentence."""
    out, word = [], -1
    for p, t in enumerate(tokens):
        piece = inv_vocab[int(t)]
        start = (t in specials or p == 0 or tokens[p - 1] in specials or p in sentence_first
                 or (not piece.startswith("##") if convention == "##" else piece.startswith(convention)))
        word += start
        out.append(word)
    return out


def check_masking(ds, tokenizer, convention, whole_words=True):
    specials = {tokenizer.cls, tokenizer.sep, tokenizer.pad}
    inv_vocab = tokenizer.inv_vocab
    masked = tokens = replaced_by_mask = kept = partial_words = 0
    for idx in range(SAMPLES):
        s = ds[idx]
        n = int(s["padding_mask"].sum())
        # padding: the pad id and a padding mask of 0 exactly after the tokens
        assert (s["padding_mask"] == (np.arange(len(s["text"])) < n)).all()
        assert (s["text"][n:] == tokenizer.pad).all() and (s["types"][n:] == 0).all()
        original = original_tokens(s)[:n]
        at = np.flatnonzero(s["loss_mask"])
        assert not specials & set(original[at].tolist()), f"sample {idx}: a special token is masked"
        assert original[0] == tokenizer.cls and s["loss_mask"][0] == 0
        masked += len(at)
        tokens += n
        replaced_by_mask += int((s["text"][at] == tokenizer.mask).sum())
        kept += int((s["text"][at] == original[at]).sum())
        word_of = words(original, inv_vocab, convention, specials, sentence_starts(ds, idx, original, specials))
        for w in set(np.asarray(word_of)[at].tolist()):
            members = [p for p in range(n) if word_of[p] == w]
            partial_words += not s["loss_mask"][members].all()
    # megatron-core's count: round(0.15 x tokens) per sample, whole n-grams only, so
    # a little under 15% at 128 tokens (19 of 128 is 14.8%); +-0.5% is the bound
    assert 0.145 <= masked / tokens <= 0.155, masked / tokens
    # 80/10/10 over ~38k masked tokens: the binomial standard error is ~0.2%
    assert 0.79 <= replaced_by_mask / masked <= 0.81
    assert 0.09 <= kept / masked <= 0.11  # kept, plus random draws of the same id (1 in 1,000)
    assert 0.09 <= (masked - replaced_by_mask - kept) / masked <= 0.11
    return partial_words


@pytest.mark.parametrize("vocabulary", ["wordpiece", "byte_bpe"])
def test_masking_statistics_and_whole_words(vocabulary, wordpiece_data, roberta_data, process_group, tmp_path):
    prefix, flags = wordpiece_data if vocabulary == "wordpiece" else roberta_data
    ds, tokenizer = build(bert_args(prefix, flags, tmp_path))
    convention = "##" if vocabulary == "wordpiece" else "\u0120"
    assert ds.config.word_starts.convention == ("wordpiece" if vocabulary == "wordpiece" else "byte-level BPE")
    if vocabulary == "byte_bpe":
        assert tokenizer.pad == 1 and tokenizer.cls == 0
    assert check_masking(ds, tokenizer, convention) == 0, "a word was masked in part"


def test_without_whole_word_masking_pieces_are_masked_alone(wordpiece_data, process_group, tmp_path):
    """The whole-word check above can fail: masking word pieces independently
    (--no-whole-word-masking --masking-max-ngram 1, run_mlm.py's way) splits words."""
    prefix, flags = wordpiece_data
    ds, tokenizer = build(bert_args(prefix, flags, tmp_path, 128, SAMPLES, "--no-whole-word-masking",
                                    "--masking-max-ngram", "1"))
    assert check_masking(ds, tokenizer, "##") > 100


def test_same_index_same_mask_and_a_new_epoch_gives_a_new_mask(wordpiece_data, process_group, tmp_path):
    prefix, flags = wordpiece_data
    args = bert_args(prefix, flags, tmp_path, 64, 3 * 1400)  # ~3 epochs of the corpus at 64 tokens
    ds, _ = build(args)
    again, _ = build(args)  # a second dataset object, its index read from the cache
    for idx in (0, 17, 999, 4000):
        a, b = ds[idx], again[idx]
        assert all((a[k] == b[k]).all() for k in ("text", "labels", "loss_mask", "types"))
    by_sentences = {}
    for idx, (beg, end, _) in enumerate(ds.sample_index):
        by_sentences.setdefault((int(beg), int(end)), []).append(idx)
    repeats = [ids[:2] for ids in by_sentences.values() if len(ids) > 1][:100]
    assert len(repeats) == 100  # the same sentences, drawn again in another epoch
    differ = sum(not np.array_equal(original_tokens(ds[i])[ds[i]["loss_mask"] == 1],
                                    original_tokens(ds[j])[ds[j]["loss_mask"] == 1]) for i, j in repeats)
    assert differ >= 95, f"only {differ} of 100 repeated samples got another mask"


# ------------------------------------------------------------------ errors and the report

def test_binary_head_on_single_sentence_documents_is_a_clear_error(bert_corpus, wordpiece_vocab, process_group,
                                                                   tmp_path):
    from megatron.training.data.pretrain import DataError
    from tools import preprocess_data

    flags = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", wordpiece_vocab]
    assert preprocess_data.main(["--input", bert_corpus, "--output-prefix", str(tmp_path / "docs"), "--workers", "1",
                                 "--log-interval", "0", *flags]) == 0  # no --split-sentences: one sequence a document
    with pytest.raises(DataError) as e:
        build(bert_args(str(tmp_path / "docs_text_document"), flags, tmp_path))
    message = str(e.value)
    assert "\n" not in message and "two sentences" in message
    assert "--split-sentences" in message and "--bert-no-binary-head" in message
    # without the binary head the same data trains
    ds, _ = build(bert_args(str(tmp_path / "docs_text_document"), flags, tmp_path, 128, 10, "--bert-no-binary-head"))
    assert len(ds) >= 10


def test_dropped_documents_are_counted_and_reported(wordpiece_vocab, process_group, tmp_path):
    from megatron.training.data.bert_dataset import count_documents

    # documents: [2 sentences], [1 sentence], [3 sentences, one of 600 tokens], [], [1 sentence of 700 tokens]
    document_indices = np.array([0, 2, 3, 6, 6, 7])
    lengths = np.array([10, 12, 8, 20, 600, 15, 700])
    with_head = count_documents(document_indices, lengths, 0, 5, binary_head=True)
    assert (with_head.used, with_head.one_sentence, with_head.long_sentence, with_head.empty) == (1, 2, 1, 1)
    # without the binary head single sentences are used, even a long one (megatron-core truncates it)
    without = count_documents(document_indices, lengths, 0, 5, binary_head=False)
    assert (without.used, without.one_sentence, without.long_sentence, without.empty) == (3, 0, 1, 1)

    long_sentence = "Long " + " ".join(["word"] * 600) + "."
    records = [{"text": "First sentence here. Second one follows."}, {"text": f"Short start. {long_sentence}"}] * 3
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", wordpiece_vocab]
    prefix = preprocess(str(corpus), str(tmp_path / "small"), *flags)
    lines = []
    build(bert_args(prefix, flags, tmp_path, 32, 4), log=lines.append)
    assert lines == [f"> BERT train split of {prefix}: 6 documents, 3 used, 3 dropped "
                     "(3 with a sentence over 512 tokens)"]
    assert os.path.isfile(prefix + ".idx")


def test_words_do_not_join_across_segments_or_sentences(wordpiece_data, roberta_data, process_group, tmp_path):
    """megatron-core joins a segment's first piece to the previous segment's
    last word when it looks like a continuation, and a byte-level BPE
    sentence's first word (tokenized alone, so without "Ġ") to the previous
    sentence: here both start a word. Masked spans of crafted sequences
    (--mask-prob 0.5, single words) show it."""
    def spans(ds, ids, trials=300):
        out = set()
        for seed in range(trials):
            _, _, _, _, masked = ds._create_masked_lm_predictions(list(ids), 128, np.random.RandomState(seed))
            out |= {tuple(indices) for indices, _ in masked}
        return out

    extra = ("--mask-prob", "0.5", "--masking-max-ngram", "1")
    wp, tok = build(bert_args(*wordpiece_data, tmp_path, 128, 10, *extra))
    vocab = {t: i for i, t in tok.inv_vocab.items()}
    the, s, cat = vocab["the"], vocab["##s"], vocab["cat"] if "cat" in vocab else vocab["for"]
    got = spans(wp, [tok.cls, the, tok.sep, s, cat, the, s, tok.sep])
    assert (5, 6) in got  # a word's pieces are masked together
    assert not any({1, 3} <= set(span) for span in got)  # not across [SEP]

    bpe, tok = build(bert_args(*roberta_data, tmp_path, 128, 10, *extra))
    pieces = tok.inv_vocab
    start = next(i for i, t in pieces.items() if t.startswith("\u0120") and len(t) > 2)
    inner = [i for i, t in sorted(pieces.items()) if t.isalpha() and not t.startswith("\u0120")][:3]
    offset = bpe.config.tokenizer.offset  # how _SentenceStarts marks a sentence's first piece
    got = spans(bpe, [tok.cls, start, inner[0], inner[1] + offset, inner[2], start, inner[0], tok.sep])
    assert (1, 2) in got and (3, 4) in got and (5, 6) in got
    assert not any({2, 3} <= set(span) for span in got)  # a new sentence starts a new word


def test_a_split_without_documents_gives_no_samples_when_none_are_asked(process_group, wordpiece_data, tmp_path):
    """Megatron-LM's default --split on a small corpus leaves the test share
    without a document; with --eval-iters 0 nothing is asked of it, and the
    run trains (megatron-core's sample-index builder used to index past the end)."""
    from megatron.training.data.bert_dataset import build_bert_datasets
    from megatron.training.tokenizer import build_tokenizer

    prefix, tokenizer_flags = wordpiece_data
    args = bert_args(prefix, tokenizer_flags, tmp_path / "cache", 32, 8, "--split", "969,30,1")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file)
    train, _, test = build_bert_datasets(args, tokenizer, log=lambda msg: None)
    assert len(train) >= 8 and train[0]["text"].shape == (32,)
    assert len(test) == 0


def test_a_bin_without_its_idx_is_one_error_naming_the_fix(wordpiece_data, process_group, tmp_path):
    """BERT data gets the .bin/.idx pairing check of the GPT path (data integrity, #15): an
    interrupted write leaving a .bin alone is named, with what to do."""
    import shutil

    from megatron.training.data.pretrain import DataError

    prefix, flags = wordpiece_data
    alone = str(tmp_path / "alone")
    shutil.copy(prefix + ".bin", alone + ".bin")
    with pytest.raises(DataError, match=f"--data-path {alone}: {alone}.bin has no partner {alone}.idx "
                                        r"\(an interrupted write leaves this\): rerun the tool"):
        build(bert_args(alone, flags, tmp_path / "cache", 32, 4))
