"""Conversation -> token ids + loss mask, through a chat template.

Built-in templates (BUILTIN_TEMPLATES) cut a conversation into text segments,
each either prompt (loss mask 0) or response (loss mask 1), tokenized one by
one (as LLaMA-Factory does), so the mask boundary falls exactly between
tokens; the price is that ids at a boundary can differ from tokenizing the
joined text.

The tokenizer's own chat template (the Jinja `chat_template` of an HF
tokenizer_config.json or chat_template.jinja: Llama 3.x, Qwen2/2.5/3, ...)
is rendered by transformers' `apply_chat_template`, and the whole
conversation is tokenized once, as `apply_chat_template(tokenize=True)`
tokenizes it: the ids are exactly what the model sees at inference. Where
each response lies in the rendered text is found from the template itself
(TokenizerTemplate), and a token is trained on when its characters overlap a
response (the rule of transformers' `return_assistant_tokens_mask`), so a
token that straddles the boundary (Qwen's "\n\n" when a response starts
with a newline) is a response token.

--chat-template:
- `auto` (default): the tokenizer's own template when it has one, otherwise
  the built-in default of the record's format: panda -> raw, alpaca ->
  alpaca, chat -> chatml.
- `tokenizer`: the tokenizer's own template (an error when it has none).
- a built-in name (BUILTIN_TEMPLATES): raw, alpaca, chatml.

With a built-in template, BOS (when the tokenizer has one distinct from EOS)
starts the example and EOS ends every response and is trained on, so the
model learns to stop. The tokenizer's own template places its special tokens
itself (Llama 3's <|begin_of_text|>; Qwen has no BOS); its response is what
the template renders for the assistant turn after the generation prompt,
end-of-turn tokens included (<|eot_id|>, "<|im_end|>\n"), so the model
learns to stop there too.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron.training.data.sft_formats import BadRecord, Conversation
from megatron.training.errors import UserError

Piece = Union[str, int]  # text to tokenize, or one token id
Segments = List[Tuple[Piece, bool]]  # (piece, is_response)


class TemplateError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class BuiltinTemplate:
    """Format strings with {content}; `user` ends with the assistant header."""

    system: str
    user: str
    assistant: str
    separator: str  # between an assistant turn and the next user turn (prompt side)


BUILTIN_TEMPLATES: Dict[str, BuiltinTemplate] = {
    # PandaLLM: the input and the target concatenated, nothing added
    "raw": BuiltinTemplate(system="{content}\n", user="{content}", assistant="{content}", separator=""),
    "alpaca": BuiltinTemplate(system="{content}\n\n", user="### Instruction:\n{content}\n\n### Response:\n",
                              assistant="{content}", separator="\n\n"),
    "chatml": BuiltinTemplate(system="<|im_start|>system\n{content}<|im_end|>\n",
                              user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                              assistant="{content}<|im_end|>", separator="\n"),
}
DEFAULT_BUILTIN = {"panda": "raw", "alpaca": "alpaca", "chat": "chatml"}
CHAT_TEMPLATE_CHOICES = ("auto", "tokenizer") + tuple(BUILTIN_TEMPLATES)


def builtin_segments(conv: Conversation, template: BuiltinTemplate, bos: Optional[int], eos: int) -> Segments:
    out: Segments = [(bos, False)] if bos is not None else []
    if conv.system:
        out.append((template.system.format(content=conv.system), False))
    for i, (role, text) in enumerate(conv.turns):
        if role == "user":
            sep = template.separator if i else ""
            out.append((sep + template.user.format(content=text), False))
        else:
            out += [(template.assistant.format(content=text), True), (eos, True)]
    return out


def builtin_prompt_segments(conv: Conversation, template: BuiltinTemplate, bos: Optional[int]) -> Segments:
    """The segments up to the last response (what generation starts from)."""
    segs = builtin_segments(conv, template, bos, eos=-1)
    return segs[:-2]


@dataclass(frozen=True)
class Rendered:
    """A conversation as the tokenizer's own template renders it, with the
    character ranges [start, end) of its responses."""

    text: str
    responses: Tuple[Tuple[int, int], ...]


class TokenizerTemplate:
    """The HF tokenizer's own chat template. The whole conversation is
    rendered once; each assistant turn k is located from two more renderings:
    the conversation up to the turn with the generation prompt, which must be
    a prefix of the whole (the response starts where it ends), and the
    conversation up to and including the turn (the response ends where it
    ends, if it is a prefix too). Some templates render a turn differently
    when it is the last one (Qwen3 adds a reasoning block to the final
    answer only); then the turn's content is found in the whole rendering
    after its start, followed by what the template puts after the content
    (the end-of-turn text). A conversation the template renders in neither
    way is reported per record (template_error)."""

    def __init__(self, render: Callable[[List[dict], bool], str]):
        self.render = render

    def rendered(self, conv: Conversation) -> Rendered:
        messages = conv.messages()
        offset = len(messages) - len(conv.turns)
        whole = self.render(messages, False)
        spans: List[Tuple[int, int]] = []
        for k, (role, content) in enumerate(conv.turns):
            if role != "assistant":
                continue
            turn = offset + k
            prompt = self.render(messages[:turn], True)
            if not whole.startswith(prompt) or (spans and len(prompt) < spans[-1][1]):
                raise BadRecord("template_error")
            spans.append((len(prompt), self._turn_end(whole, prompt, messages[:turn + 1], content)))
        return Rendered(whole, tuple(spans))

    def _turn_end(self, whole: str, prompt: str, messages: List[dict], content: str) -> int:
        alone = self.render(messages, False)
        if not alone.startswith(prompt) or len(alone) == len(prompt):
            raise BadRecord("template_error")
        if whole.startswith(alone):
            return len(alone)
        core = content.strip()  # templates may trim the content (Llama 3's `| trim`)
        at = alone.rfind(core)
        found = whole.find(core, len(prompt))
        if at < len(prompt) or found < 0:
            raise BadRecord("template_error")
        tail = alone[at + len(core):]
        end = found + len(core)
        if not whole.startswith(tail, end):
            raise BadRecord("template_error")
        return end + len(tail)


def response_mask(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """1 for each token whose characters [start, end) overlap a response span,
    as transformers' `return_assistant_tokens_mask` marks assistant tokens."""
    mask = [0] * len(offsets)
    i = 0
    for t, (start, end) in enumerate(offsets):
        while i < len(spans) and start >= spans[i][1]:
            i += 1
        if i == len(spans):
            break
        if end > spans[i][0]:
            mask[t] = 1
    return mask


def tokenizer_chat_template(tokenizer) -> Optional[str]:
    """The chat template of an HF tokenizer directory, read from its files
    (without importing transformers), or None."""
    path = getattr(tokenizer, "model_path", None)
    if path is None or not hasattr(tokenizer, "hf_tokenizer"):
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("chat_template") or None
    return None


class SFTEncoder:
    """Turns conversations into (ids, loss mask) with the chosen template."""

    def __init__(self, tokenizer, chat_template: str = "auto"):
        if chat_template not in CHAT_TEMPLATE_CHOICES:
            raise TemplateError(f"unknown --chat-template {chat_template!r}: choose one of "
                                f"{', '.join(CHAT_TEMPLATE_CHOICES)}")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eod
        bos = getattr(tokenizer, "bos", None)
        self.bos = bos if bos is not None and bos != self.eos else None
        self.own = None
        if chat_template in ("auto", "tokenizer") and tokenizer_chat_template(tokenizer):
            hf = tokenizer.hf_tokenizer
            self.own = TokenizerTemplate(
                lambda msgs, gen: hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))
            self._hf = hf
        elif chat_template == "tokenizer":
            raise TemplateError(
                f"the tokenizer {getattr(tokenizer, 'model_path', type(tokenizer).__name__)} has no chat template: "
                f"choose a built-in one with --chat-template ({', '.join(BUILTIN_TEMPLATES)})")
        self.builtin = BUILTIN_TEMPLATES.get(chat_template)

    @property
    def description(self) -> str:
        return "the tokenizer's own chat template" if self.own else (
            f"built-in template {self._name()}")

    def _name(self) -> str:
        for name, t in BUILTIN_TEMPLATES.items():
            if t is self.builtin:
                return name
        return "per format (" + ", ".join(f"{k} -> {v}" for k, v in DEFAULT_BUILTIN.items()) + ")"

    def segments(self, conv: Conversation, prompt_only: bool = False) -> Union[Segments, Rendered]:
        """What encode_many turns into ids and mask: a built-in template's
        segments, or the tokenizer's own rendering (prompt_only: the text
        before the last response, the generation prompt)."""
        if self.own is not None:
            rendered = self.own.rendered(conv)
            if prompt_only:
                return Rendered(rendered.text[:rendered.responses[-1][0]], ())
            return rendered
        template = self.builtin or BUILTIN_TEMPLATES[DEFAULT_BUILTIN[conv.source]]
        if prompt_only:
            return builtin_prompt_segments(conv, template, self.bos)
        return builtin_segments(conv, template, self.bos, self.eos)

    def encode_many(self, items: Sequence[Union[Segments, Rendered]]) -> List[Tuple[List[int], List[int]]]:
        """(ids, loss mask) per item (segments() of a conversation); one
        tokenizer batch call for all built-in segment texts, one for all
        renderings of the tokenizer's own template."""
        texts = [p for item in items if not isinstance(item, Rendered) for p, _ in item if isinstance(p, str)]
        encoded = iter(self.tokenizer.tokenize_batch(texts) if texts else [])
        whole = [item.text for item in items if isinstance(item, Rendered)]
        rendered = iter(self._encode_rendered(whole) if whole else [])
        out = []
        for item in items:
            if isinstance(item, Rendered):
                ids, offsets = next(rendered)
                out.append((ids, response_mask(offsets, item.responses)))
                continue
            ids: List[int] = []
            mask: List[int] = []
            for piece, response in item:
                part = next(encoded) if isinstance(piece, str) else [piece]
                ids += part
                mask += [int(response)] * len(part)
            out.append((ids, mask))
        return out

    def _encode_rendered(self, texts: List[str]) -> List[Tuple[List[int], List[Tuple[int, int]]]]:
        """(ids, character offsets) of rendered conversations, tokenized by
        transformers as `apply_chat_template(tokenize=True)` does (no special
        token added: the template wrote them)."""
        enc = self._hf(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def encode(self, conv: Conversation) -> Tuple[List[int], List[int]]:
        return self.encode_many([self.segments(conv)])[0]

    def encode_prompt(self, conv: Conversation) -> List[int]:
        """Ids of everything before the last response: the generation prompt."""
        return self.encode_many([self.segments(conv, prompt_only=True)])[0][0]
