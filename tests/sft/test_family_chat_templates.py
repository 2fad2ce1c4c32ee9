"""SFT with each base's own chat template (Llama 3.1, Qwen2.5, Qwen3 style,
tests/family_tokenizers.py): our token ids equal transformers'
`apply_chat_template(tokenize=True)` on the same messages, and our loss mask
equals transformers' `return_assistant_tokens_mask` (the templates mark the
assistant turns with {% generation %}, which renders nothing)."""

import pytest

from megatron.training.data.sft_formats import record_to_conversation
from megatron.training.data.sft_templates import SFTEncoder
from megatron.training.tokenizer import build_tokenizer
from tests.family_tokenizers import (
    QWEN3_CHAT_TEMPLATE, make_llama3_tokenizer, make_qwen2_tokenizer,
)
from tests.sft.conftest import write_jsonl

RECORDS = [
    # system, two turns, contents with spaces and newlines around them (Llama 3 trims them, Qwen keeps them)
    {"messages": [{"role": "system", "content": " Answer in one word. "},
                  {"role": "user", "content": "Sentiment of 'Shares plunge after guidance cut'?"},
                  {"role": "assistant", "content": "negative"},
                  {"role": "user", "content": "营业收入同比增长12.5%，情绪？"},
                  {"role": "assistant", "content": "\npositive  "}]},
    # no system message: Llama 3.1 still writes its dated system block, Qwen2.5 its default system text
    {"messages": [{"role": "user", "content": "Rate 3.45%?"}, {"role": "assistant", "content": "held"}]},
    # FinLoRA / PandaLLM and Alpaca records go through the same template
    {"context": "Headline: 沪深300指数收涨1.2%", "target": "positive"},
    {"instruction": "Classify.", "input": "Revenue fell 2%.", "output": "negative",
     "history": [["Hi", "Hello! How can I help?"]]},
]

FAMILIES = {
    "llama3.1": lambda path: make_llama3_tokenizer(path),
    "qwen2.5": lambda path: make_qwen2_tokenizer(path),
    "qwen3": lambda path: make_qwen2_tokenizer(path, chat_template=QWEN3_CHAT_TEMPLATE),
}
# What each family trains on in the first record: the responses with their end-of-turn text.
RESPONSES = {
    "llama3.1": ["negative<|eot_id|>", "positive<|eot_id|>"],
    # the response's leading newline joins the header's into one "\n\n" token, which is trained on
    "qwen2.5": ["negative<|im_end|>\n", "\n\npositive  <|im_end|>\n"],
    "qwen3": ["negative<|im_end|>\n", "<think>\n\n</think>\n\npositive  <|im_end|>\n"],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, tokenizer directory, our encoder, transformers' tokenizer)."""
    from transformers import AutoTokenizer

    path = FAMILIES[request.param](str(tmp_path_factory.mktemp(request.param)))
    encoder = SFTEncoder(build_tokenizer("HuggingFaceTokenizer", path, legacy=False))
    assert encoder.own is not None, "auto picks the tokenizer's own template"
    return request.param, path, encoder, AutoTokenizer.from_pretrained(path)


def reference(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


def test_ids_and_mask_equal_transformers(family):
    name, _, encoder, hf = family
    for record in RECORDS:
        conv = record_to_conversation(record)
        ids, mask = encoder.encode(conv)
        ref = reference(hf, conv.messages(), return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"], (name, record)
        assert mask == ref["assistant_masks"], (name, record)
        # the generation prompt: the conversation before its last answer
        prompt = reference(hf, conv.messages()[:-1], add_generation_prompt=True)["input_ids"]
        assert encoder.encode_prompt(conv) == prompt
    # the mask is not trivially equal: it keeps exactly the responses and their end-of-turn text
    ids, mask = encoder.encode(record_to_conversation(RECORDS[0]))
    runs, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [hf.decode(run)], []
    assert runs == RESPONSES[name]
    assert ids[0] == (hf.bos_token_id if name == "llama3.1" else hf.convert_tokens_to_ids("<|im_start|>"))
    assert ids.count(hf.bos_token_id) == 1 if name == "llama3.1" else hf.bos_token_id is None


def test_a_token_across_the_boundary_is_kept_whole(tmp_path):
    """Qwen: "<|im_start|>assistant\\n" then a response starting with a newline
    is one "\\n\\n" token. Tokenizing prompt and response apart (as the built-in
    templates do) would change the ids; rendering once keeps transformers' ids,
    and the straddling token is trained on, as transformers marks it."""
    from transformers import AutoTokenizer

    path = make_qwen2_tokenizer(str(tmp_path / "qwen"))
    encoder, hf = SFTEncoder(build_tokenizer("HuggingFaceTokenizer", path, legacy=False)), AutoTokenizer.from_pretrained(path)
    conv = record_to_conversation(RECORDS[0])
    rendered = encoder.segments(conv)
    start = rendered.responses[-1][0]
    apart = (hf(rendered.text[:start], add_special_tokens=False).input_ids
             + hf(rendered.text[start:], add_special_tokens=False).input_ids)
    ids, mask = encoder.encode(conv)
    assert apart != ids and ids == reference(hf, conv.messages())["input_ids"]
    straddling = len(hf(rendered.text[:start], add_special_tokens=False).input_ids) - 1
    assert hf.decode(ids[straddling]) == "\n\n" and mask[straddling] == 1 and mask[straddling - 1] == 0


def test_preprocess_sft_data_writes_the_same_ids_and_mask(family, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tools.preprocess_sft_data import main

    name, path, encoder, hf = family
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    assert main(["--input", data, "--output-prefix", str(tmp_path / "sft"), "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", path, "--workers", "1"]) == 0
    tokens, masks = IndexedDataset(str(tmp_path / "sft_text_document")), IndexedDataset(
        str(tmp_path / "sft_loss_mask_document"))
    assert len(tokens) == len(RECORDS)
    for i, record in enumerate(RECORDS):
        ref = reference(hf, record_to_conversation(record).messages(), return_assistant_tokens_mask=True)
        assert tokens[i].tolist() == ref["input_ids"] and masks[i].tolist() == ref["assistant_masks"], (name, i)
