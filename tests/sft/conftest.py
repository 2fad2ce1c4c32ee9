"""Tokenizers for the SFT tests, built in a second and exact enough to check
masks token by token: a character tokenizer (id = code point) and an HF
word-level tokenizer directory with its own chat template."""

import json
import os

# A chat template in the style of Zephyr/Llama-3 templates: each turn opens
# with a role token; an assistant turn ends with <|end|> (the EOS).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


class CharTokenizer:
    """One token per character (id = code point); BOS 1, EOS 2."""

    bos, eod, vocab_size = 1, 2, 0x3000

    def tokenize_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def make_word_tokenizer(path, words, chat_template=CHAT_TEMPLATE):
    """An HF tokenizer directory: whitespace-separated words, the SPECIALS
    as special tokens, eos <|end|>, and `chat_template` (None: none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|end|>",
                                   pad_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return str(path), vocab


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def exists(prefix):
    return os.path.exists(prefix + "_text_document.idx") and os.path.exists(prefix + "_loss_mask_document.idx")
