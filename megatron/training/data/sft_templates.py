"""Conversation -> token ids + loss mask, through a chat template.

A template cuts a conversation into text segments, each either prompt
(loss mask 0) or response (loss mask 1). Segments are tokenized one by one
(as LLaMA-Factory does), so the mask boundary falls exactly between tokens;
the price is that ids at a boundary can differ from tokenizing the joined text.

--chat-template:
- `auto` (default): the tokenizer's own template when it has one (an HF
  tokenizer whose tokenizer_config.json has "chat_template", or a
  chat_template.jinja file), otherwise the built-in default of the record's
  format: panda -> raw, alpaca -> alpaca, chat -> chatml.
- `tokenizer`: the tokenizer's own template (an error when it has none).
- a built-in name (BUILTIN_TEMPLATES): raw, alpaca, chatml.

With a built-in template, BOS (when the tokenizer has one distinct from EOS)
starts the example and EOS ends every response and is trained on, so the
model learns to stop. The tokenizer's own template places its special tokens
itself; its response segment is what rendering one more assistant message
adds (e.g. "Hello<|im_end|>\\n"), so end-of-turn tokens are trained on too.
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


class TokenizerTemplate:
    """The HF tokenizer's own chat template, rendered once per assistant turn:
    the text before the turn (with the generation prompt) is prompt, what the
    turn adds is response. Templates that do not render conversations as
    growing prefixes (some rewrite earlier turns) are reported per record."""

    def __init__(self, render: Callable[[List[dict], bool], str]):
        self.render = render

    def segments(self, conv: Conversation) -> Segments:
        messages = conv.messages()
        offset = len(messages) - len(conv.turns)
        out: Segments = []
        done = ""
        for k, (role, _) in enumerate(conv.turns):
            if role != "assistant":
                continue
            prompt = self.render(messages[:offset + k], True)
            full = self.render(messages[:offset + k + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt) or len(full) == len(prompt):
                raise BadRecord("template_error")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return out

    def prompt_segments(self, conv: Conversation) -> Segments:
        return self.segments(conv)[:-1]


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

    def segments(self, conv: Conversation, prompt_only: bool = False) -> Segments:
        if self.own is not None:
            return self.own.prompt_segments(conv) if prompt_only else self.own.segments(conv)
        template = self.builtin or BUILTIN_TEMPLATES[DEFAULT_BUILTIN[conv.source]]
        if prompt_only:
            return builtin_prompt_segments(conv, template, self.bos)
        return builtin_segments(conv, template, self.bos, self.eos)

    def encode_many(self, segment_lists: Sequence[Segments]) -> List[Tuple[List[int], List[int]]]:
        """(ids, loss mask) per segment list; one tokenizer batch call for all texts."""
        texts = [p for segs in segment_lists for p, _ in segs if isinstance(p, str)]
        encoded = iter(self.tokenizer.tokenize_batch(texts) if texts else [])
        out = []
        for segs in segment_lists:
            ids: List[int] = []
            mask: List[int] = []
            for piece, response in segs:
                part = next(encoded) if isinstance(piece, str) else [piece]
                ids += part
                mask += [int(response)] * len(part)
            out.append((ids, mask))
        return out

    def encode(self, conv: Conversation) -> Tuple[List[int], List[int]]:
        return self.encode_many([self.segments(conv)])[0]

    def encode_prompt(self, conv: Conversation) -> List[int]:
        """Ids of everything before the last response: the generation prompt."""
        return self.encode_many([self.segments(conv, prompt_only=True)])[0][0]
