"""Tiny tokenizers in the format the Llama-3.x and Qwen2/2.5/3 bases ship,
built here with the `tokenizers` library (nothing is downloaded).

What is the same as the real files: a byte-level BPE (tokenizer.json) whose
pre-tokenizer is the family's published split pattern followed by byte-level
mapping, the family's special tokens as added tokens after the ordinary
vocabulary (so `len(tokenizer)` = ordinary + special, as 128,256 and 151,665
are), the post-processor (Llama 3 prepends <|begin_of_text|>; Qwen adds
nothing, it has no BOS), and a tokenizer_config.json of the family's form
(tokenizer_class, bos/eos/pad, added_tokens_decoder, chat_template). What is
smaller: the ordinary vocabulary (a few hundred merges learnt from a
paragraph of text) and the number of reserved special tokens.

The chat templates are written here in the style of each family's template
(the parts that decide token ids and masks: BOS, role headers, end-of-turn
tokens, Llama 3.1's dated system block and trimmed contents, Qwen2.5's
default system message, Qwen3's empty reasoning block on the final answer).
Assistant turns are wrapped in {% generation %} ... {% endgeneration %}: this
renders nothing, and lets transformers' `return_assistant_tokens_mask` give an
independent reference mask for the tests.
"""

import json
import os

# The split patterns of the families' tokenizer.json pre-tokenizers: Llama 3
# groups up to three digits, Qwen2 splits every digit.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# (token, special): Qwen2.5 also adds tool-call markers that are not special tokens
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|vision_pad|>", True),
               ("<tool_call>", False), ("</tool_call>", False)]

LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}{{- message.content + '<|im_end|>\n' }}{%- endgeneration %}"
    "{%- elif message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3: an assistant turn after the last user message (the final answer) carries
# an (empty) reasoning block; earlier turns do not. Rendering a conversation cut
# after an earlier assistant turn therefore changes that turn: the rendering is
# not a growing prefix, which the SFT encoder must handle.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}"
    "{%- if loop.index0 > ns.last_query %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{{- message.content.lstrip('\n') + '<|im_end|>\n' }}"
    "{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

# What the tiny vocabularies learn their merges from: English and Chinese
# finance text, numbers, code-like lines and whitespace runs.
CORPUS = [
    "Revenue rose 12.5% year over year to $4,321 million, while operating margin widened by 230 basis points.",
    "The central bank held its policy rate at 3.45% and signalled two cuts before the end of 2025.",
    "营业收入同比增长12.5%，净利润为4321万元。公司董事会建议每10股派发现金红利3元。",
    "沪深300指数收涨1.2%，成交额突破1万亿元，北向资金净流入56亿元。",
    "Q: What is the sentiment of 'Shares plunge after guidance cut'?\nA: negative\n\n",
    "Outlook\n\nWe expect margins to stabilise.\n\nRisks\n\nRates, currency and demand.\n\n",
    "def price(x):\n    return round(x * 1.05, 2)\n\t# tabs and  double  spaces\n",
    "It's the firm's view that they'll hedge; we've seen I'm not sure you'd agree.",
]


def _train_bpe(split: str, vocab_size: int, nfc: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


def _added_tokens_decoder(tok, added):
    return {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": special} for t, special in added}


def _write(path, tok, config):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return str(path)


def make_llama3_tokenizer(path, eos="<|eot_id|>", chat_template=LLAMA31_CHAT_TEMPLATE, vocab_size=384):
    """A Llama-3.1-style tokenizer directory; eos <|eot_id|> as the Instruct
    model's, <|end_of_text|> as the base model's. Returns the path."""
    from tokenizers import AddedToken, processors

    tok = _train_bpe(LLAMA3_SPLIT, vocab_size, nfc=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    config = {"added_tokens_decoder": _added_tokens_decoder(tok, [(t, True) for t in LLAMA3_SPECIALS]),
              "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": eos,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        config["chat_template"] = chat_template
    return _write(path, tok, config)


def make_qwen2_tokenizer(path, eos="<|im_end|>", chat_template=QWEN25_CHAT_TEMPLATE, vocab_size=384):
    """A Qwen2/2.5/3-style tokenizer directory: no BOS, pad <|endoftext|>;
    eos <|im_end|> as the Instruct models', <|endoftext|> as the base
    models'. Returns the path."""
    from tokenizers import AddedToken, processors

    tok = _train_bpe(QWEN2_SPLIT, vocab_size, nfc=True)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in QWEN2_ADDED])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    config = {"add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(tok, QWEN2_ADDED),
              "additional_special_tokens": [t for t, special in QWEN2_ADDED if special and t != "<|endoftext|>"],
              "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": eos, "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    if chat_template:
        config["chat_template"] = chat_template
    return _write(path, tok, config)


# Texts whose ids depend on the pre-tokenizer, the normaliser and the special
# tokens: digit runs, CJK, whitespace runs, newlines, contractions, special
# tokens written in the text, a decomposed accent (NFC folds it for Qwen).
TRICKY_TEXTS = CORPUS + [
    "", " leading space", "12345678 and 2025-06-30", "line\n\n\nbreaks \t\ttabs   end  ",
    "<|im_start|>user\nhi<|im_end|>\n", "<|begin_of_text|>x<|eot_id|>", "Cafe\u0301 caf\u00e9", "<tool_call>{}",
]
