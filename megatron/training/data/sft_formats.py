"""Supervised fine-tuning records: one jsonl line -> a conversation, or the
reason to skip the line.

Every supported record format becomes the same thing, a `Conversation`: an
optional system text and alternating user / assistant turns ending with an
assistant turn. Templates (sft_templates.py) turn a conversation into token
ids and a loss mask; the loss is taken on the assistant turns only.

| --sft-format | record                                                        | conversation                              |
| ------------ | ------------------------------------------------------------- | ----------------------------------------- |
| panda        | {"input", "target"} (PandaLLM); {"context", "target"} (FinLoRA) | user: input / context; assistant: target |
| alpaca       | {"instruction", "input"?, "output", "system"?, "history"?}    | system; history pairs; user: instruction  |
|              | (Alpaca / LLaMA-Factory; history = [[query, response], ...])  | + "\\n" + input (when non-empty); assistant: output |
| chat         | {"messages": [{"role", "content"}, ...]}                      | roles system (first only), user, assistant |
| auto         | per record, by the first key present: messages -> chat, instruction -> alpaca,      |              |
|              | target or input -> panda, output -> alpaca                                          |              |
"""

import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

SFT_FORMATS = ("auto", "panda", "alpaca", "chat")

# Reasons a line is skipped, in report order, with what the user should fix.
SFT_BAD_REASONS = {
    "invalid_utf8": "not valid UTF-8",
    "not_json": "not a JSON object",
    "empty": "empty line",
    "unknown_format": "no 'messages', 'instruction' or 'input'/'target' key: give --sft-format or fix the record",
    "missing_field": "a required field is missing (panda: input or context, target; alpaca: instruction, output; "
                     "chat: messages with role and content)",
    "not_text": "a field has the wrong type (texts are strings; history is [[query, response], ...]; "
                "messages is a list of {role, content})",
    "empty_response": "the response (target / output / an assistant turn) is empty",
    "wrong_role": "roles must be: system (first message only), then user and assistant alternating, "
                  "starting with user and ending with assistant",
    "template_error": "the chat template could not render the conversation incrementally",
    "bad_tokens": "a text the tokenizer cannot encode (NullTokenizer: whole ids in [0, --vocab-size))",
}


@dataclass
class Conversation:
    """turns: [(role, text)] with roles "user" / "assistant" alternating,
    starting with "user" and ending with "assistant"."""

    turns: List[Tuple[str, str]] = field(default_factory=list)
    system: Optional[str] = None
    source: str = "chat"  # the record format it came from (picks the default template)

    def messages(self) -> List[dict]:
        """The chat-template form: [{"role", "content"}]."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": r, "content": t} for r, t in self.turns]


class BadRecord(ValueError):
    def __init__(self, reason: str):
        assert reason in SFT_BAD_REASONS, reason
        super().__init__(reason)
        self.reason = reason


def parse_sft_line(line: bytes, sft_format: str = "auto") -> Union[Conversation, str]:
    """The conversation of one jsonl line, or a key of SFT_BAD_REASONS."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    if not text.strip():
        return "empty"
    try:
        record = json.loads(text)
    except ValueError:
        return "not_json"
    if not isinstance(record, dict):
        return "not_json"
    try:
        return record_to_conversation(record, sft_format)
    except BadRecord as e:
        return e.reason


def detect_format(record: dict) -> str:
    # the most telling key first; a record lacking another key of its format
    # is then reported as missing_field, which names what to add
    for key, fmt in (("messages", "chat"), ("instruction", "alpaca"), ("target", "panda"), ("input", "panda"),
                     ("output", "alpaca")):
        if key in record:
            return fmt
    raise BadRecord("unknown_format")


def record_to_conversation(record: dict, sft_format: str = "auto") -> Conversation:
    fmt = detect_format(record) if sft_format == "auto" else sft_format
    conv = _CONVERTERS[fmt](record)
    conv.source = fmt
    return conv


def _text(record: dict, key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord("missing_field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord("not_text")
    return value


def _response(text: str) -> str:
    if not text.strip():
        raise BadRecord("empty_response")
    return text


def _from_panda(record: dict) -> Conversation:
    prompt = _text(record, "context" if "input" not in record and "context" in record else "input")
    return Conversation([("user", prompt), ("assistant", _response(_text(record, "target")))])


def _from_alpaca(record: dict) -> Conversation:
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    output = _response(_text(record, "output"))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord("not_text")
    turns = []
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise BadRecord("not_text")
        turns += [("user", pair[0]), ("assistant", _response(pair[1]))]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    turns += [("user", prompt), ("assistant", output)]
    return Conversation(turns, _text(record, "system", required=False) or None)


def _from_chat(record: dict) -> Conversation:
    messages = record.get("messages")
    if messages is None:
        raise BadRecord("missing_field")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRecord("not_text")
    system = None
    for m in messages:
        if "role" not in m or "content" not in m:
            raise BadRecord("missing_field")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise BadRecord("not_text")
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"] or None, messages[1:]
    turns = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadRecord("wrong_role")
        turns.append((m["role"], _response(m["content"]) if expected == "assistant" else m["content"]))
    if not turns or turns[-1][0] != "assistant":
        raise BadRecord("wrong_role")
    return Conversation(turns, system)


_CONVERTERS = {"panda": _from_panda, "alpaca": _from_alpaca, "chat": _from_chat}
