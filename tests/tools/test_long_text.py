"""Long texts tokenized in pieces give exactly the ids of tokenizing them whole
(megatron/training/data/long_text.py), for every tokenizer family the data
tools support; the independent reference is the tokenizer's own call on the
whole text."""

import numpy as np
import pytest

from megatron.training.data.long_text import tokenize_long, tokenize_texts
from megatron.training.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def text(corpus):
    """~150 KB of prose and code: newlines, runs of spaces, punctuation, digits."""
    return " ".join(corpus[1][:80])


@pytest.fixture(scope="module")
def llama_like_sp(corpus, tmp_path_factory):
    """A sentencepiece model normalized as Llama 2's is (identity, spaces kept
    as they are), whose dummy prefix makes a cut drop the space."""
    import sentencepiece

    prefix = str(tmp_path_factory.mktemp("llama_like") / "sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus[1]), model_prefix=prefix, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return prefix + ".model"


CASES = {
    # name: (tokenizer type, which fixture gives its file, legacy, the seam rule it needs, ids added to every text)
    "sentencepiece": ("Llama2Tokenizer", "sp_model", False, "keep", 0),
    "llama2_bos": ("Llama2Tokenizer", "sp_model", True, "keep", 1),
    "llama_like_dummy_prefix": ("Llama2Tokenizer", "llama_like_sp", True, "drop", 1),
    "sentencepiece_specials": ("SentencePieceTokenizer", "sp_model", True, "keep", 0),
    "hf_byte_level": ("HuggingFaceTokenizer", "hf_dir", False, "keep", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_texts_are_tokenized_in_pieces_with_the_same_ids(case, text, request):
    kind, fixture, legacy, rule, added = CASES[case]
    tok = build_tokenizer(kind, request.getfixturevalue(fixture), legacy=legacy)
    if kind == "SentencePieceTokenizer":
        text = text.replace(" the ", " the<EOD> ", 50)  # legacy special tokens inside the text
    whole = tok.tokenize_batch([text])[0]
    pieces = tokenize_long(tok, text, np.int32, piece_chars=3000)  # ~50 seams
    assert tok._long_text_plan.rule == rule and len(tok._long_text_plan.head) == added
    assert pieces.tolist() == whole


def test_null_tokenizer_and_texts_without_a_seam(sp_model):
    null = build_tokenizer("NullTokenizer", vocab_size=1000)
    ids = " ".join(str(i % 997) for i in range(20_000))
    assert tokenize_long(null, ids, np.int32, piece_chars=500).tolist() == null.tokenize(ids)
    sp = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    no_space = "abcdefghij" * 2000  # nowhere to cut: tokenized whole, still the same ids
    assert tokenize_long(sp, no_space, np.int32, piece_chars=500).tolist() == sp.tokenize(no_space)
    # the batch entry point sends only the long texts through the pieces, in order
    got = tokenize_texts(null, ["1 2", ids, "3"], np.int32, long_chars=1000)
    assert [list(g) for g in got] == [[1, 2], null.tokenize(ids), [3]] and isinstance(got[1], np.ndarray)
