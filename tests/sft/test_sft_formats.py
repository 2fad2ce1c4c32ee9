"""SFT records -> token ids + loss mask, checked token by token, and bad
records counted with file:line. The references are written out by hand
from the template definitions (character tokenizer: one id per character;
word tokenizer: one id per word)."""

import numpy as np
import pytest

from megatron.training.data.sft_formats import record_to_conversation
from megatron.training.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft, sft_report_text
from megatron.training.data.sft_templates import SFTEncoder, TemplateError
from megatron.training.tokenizer import build_tokenizer
from tests.sft.conftest import CharTokenizer, make_word_tokenizer, write_jsonl

BOS, EOS = 1, 2


def chars(text, response):
    return [ord(c) for c in text], [int(response)] * len(text)


def expected(*parts):
    """parts: (text or id, is_response) -> (ids, mask)."""
    ids, mask = [], []
    for piece, response in parts:
        i, m = chars(piece, response) if isinstance(piece, str) else ([piece], [int(response)])
        ids += i
        mask += m
    return ids, mask


def encode(record, template="auto", tokenizer=None):
    return SFTEncoder(tokenizer or CharTokenizer(), template).encode(record_to_conversation(record))


def test_panda_masks_the_input_and_trains_target_and_eos():
    ids, mask = encode({"input": "Buy?", "target": "Hold."})
    assert (ids, mask) == expected((BOS, 0), ("Buy?", 0), ("Hold.", 1), (EOS, 1))
    # FinLoRA's records name the prompt "context"
    assert encode({"context": "Buy?", "target": "Hold."}) == (ids, mask)


def test_alpaca_with_system_history_and_input():
    record = {"system": "Be brief.", "history": [["Q1", "A1"]], "instruction": "Rate", "input": "AAPL",
              "output": "Buy"}
    ids, mask = encode(record)
    assert (ids, mask) == expected(
        (BOS, 0), ("Be brief.\n\n", 0),
        ("### Instruction:\nQ1\n\n### Response:\n", 0), ("A1", 1), (EOS, 1),
        ("\n\n### Instruction:\nRate\nAAPL\n\n### Response:\n", 0), ("Buy", 1), (EOS, 1))


def test_chat_chatml_trains_every_assistant_turn():
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                           {"role": "assistant", "content": "a2"}]}
    ids, mask = encode(record)
    assert (ids, mask) == expected(
        (BOS, 0), ("<|im_start|>system\nS<|im_end|>\n", 0),
        ("<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n", 0), ("a1<|im_end|>", 1), (EOS, 1),
        ("\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n", 0), ("a2<|im_end|>", 1), (EOS, 1))


def test_named_builtin_overrides_the_format_default():
    ids, mask = encode({"instruction": "Hi", "output": "Yo"}, template="raw")
    assert (ids, mask) == expected((BOS, 0), ("Hi", 0), ("Yo", 1), (EOS, 1))


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    path, vocab = make_word_tokenizer(tmp_path_factory.mktemp("wt"), "buy sell hold why because up down".split())
    return build_tokenizer("HuggingFaceTokenizer", path, legacy=False), vocab


def test_tokenizer_own_template_masks_exactly_the_assistant_tokens(word_tok):
    tok, v = word_tok
    record = {"messages": [{"role": "system", "content": "hold"}, {"role": "user", "content": "why"},
                           {"role": "assistant", "content": "because up"}, {"role": "user", "content": "buy"},
                           {"role": "assistant", "content": "sell"}]}
    encoder = SFTEncoder(tok)
    assert encoder.own is not None, "auto should pick the tokenizer's own template"
    ids, mask = encoder.encode(record_to_conversation(record))
    words = [("<|system|>", 0), ("hold", 0), ("<|user|>", 0), ("why", 0), ("<|assistant|>", 0),
             ("because", 1), ("up", 1), ("<|end|>", 1),
             ("<|user|>", 0), ("buy", 0), ("<|assistant|>", 0), ("sell", 1), ("<|end|>", 1)]
    assert ids == [v[w] for w, _ in words]
    assert mask == [m for _, m in words]
    # the generation prompt is everything before the last response
    assert encoder.encode_prompt(record_to_conversation(record)) == [v[w] for w, _ in words[:-2]]
    # other formats go through the same template under auto
    ids, mask = encoder.encode(record_to_conversation({"input": "why", "target": "down"}))
    assert ids == [v["<|user|>"], v["why"], v["<|assistant|>"], v["down"], v["<|end|>"]]
    assert mask == [0, 0, 0, 1, 1]


def test_missing_tokenizer_template_names_the_fix(tmp_path):
    path, _ = make_word_tokenizer(tmp_path / "plain", ["a"], chat_template=None)
    tok = build_tokenizer("HuggingFaceTokenizer", path, legacy=False)
    with pytest.raises(TemplateError, match="--chat-template"):
        SFTEncoder(tok, "tokenizer")
    assert SFTEncoder(tok).own is None  # auto falls back to the built-in templates


GOOD = [{"input": "1 2", "target": "3"}, {"instruction": "4", "output": "5 6"},
        {"messages": [{"role": "user", "content": "7"}, {"role": "assistant", "content": "8"}]}]
BAD = {  # line content -> reason
    '{"input": "1"}': "missing_field",
    '{"instruction": "1", "output": "  "}': "empty_response",
    '{"messages": [{"role": "assistant", "content": "1"}]}': "wrong_role",
    '{"messages": [{"role": "user", "content": "1"}, {"role": "bot", "content": "2"}]}': "wrong_role",
    '{"messages": [{"role": "user", "content": "1"}]}': "wrong_role",
    '{"messages": [{"role": "user"}]}': "missing_field",
    '{"input": 5, "target": "1"}': "not_text",
    '{"text": "1"}': "unknown_format",
    "not json": "not_json",
    '{"input": "1 x", "target": "2"}': "bad_tokens",  # NullTokenizer: not an id
    '{"input": "1", "target": "77"}': "bad_tokens",  # NullTokenizer: id >= --vocab-size 50
}


def test_preprocess_counts_bad_records_with_file_and_line(tmp_path):
    lines = [GOOD[0], *BAD, GOOD[1], GOOD[2]]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    messages = []
    cfg = SFTPreprocessConfig(input=path, output_prefix=str(tmp_path / "out"), tokenizer_type="NullTokenizer",
                              vocab_size=50, chat_template="raw")
    report = preprocess_sft(cfg, log=messages.append)
    assert report.documents == 3
    want = {}
    for reason in BAD.values():
        want[reason] = want.get(reason, 0) + 1
    assert report.bad == want
    for lineno, (line, reason) in enumerate(BAD.items(), start=2):
        assert (path, lineno) in report.bad_examples[reason]  # up to 3 examples are kept per reason
    assert f"skipping {path}:2:" in messages[1] and "missing" in messages[1]
    text = sft_report_text(report)
    assert "wrong_role" in text and f"{path}:4" in text and "response tokens" in text

    # what the files hold is what the encoder gives, example by example
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    toks, masks = IndexedDataset(str(tmp_path / "out_text_document")), IndexedDataset(
        str(tmp_path / "out_loss_mask_document"))
    encoder = SFTEncoder(build_tokenizer("NullTokenizer", vocab_size=50, legacy=False), "raw")
    for i, record in enumerate(GOOD):
        ids, mask = encoder.encode(record_to_conversation(record))
        assert toks[i].tolist() == ids and masks[i].tolist() == mask
    assert masks[0].dtype == np.uint8


def test_strict_stops_at_the_first_bad_record(tmp_path):
    from megatron.training.data.jsonl_reader import InputError

    path = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], '{"input": "1", "target": ""}'])
    cfg = SFTPreprocessConfig(input=path, output_prefix=str(tmp_path / "out"), tokenizer_type="NullTokenizer",
                              vocab_size=50, strict=True)
    with pytest.raises(InputError, match=f"{path}:2: .*response.*--strict"):
        preprocess_sft(cfg, log=lambda m: None)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
