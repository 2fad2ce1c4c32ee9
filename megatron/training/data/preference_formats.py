"""Preference records: one jsonl line -> a pair of conversations (chosen,
rejected) that share everything but their last assistant turn, or the
reason the line is refused.

| record (per line, detected by its keys)                          | prompt                     | responses   |
| ---------------------------------------------------------------- | -------------------------- | ----------- |
| {"prompt": str, "chosen": str, "rejected": str} (TRL standard)   | user: prompt (SFT panda)   | the strings |
| {"instruction", "input"?, "system"?, "history"?, "chosen": str,  | as SFT alpaca: system,     | the strings |
|  "rejected": str} (LLaMA-Factory, Alpaca format)                 | history, instruction+input |             |
| {"prompt": [messages]?, "chosen": [messages], "rejected": [...]} | prompt messages; without   | the last    |
| (chat / TRL conversational; messages = {"role", "content"})      | "prompt", the messages     | assistant   |
|                                                                  | chosen and rejected share  | message     |

Each side is parsed by the SFT parser (sft_formats.py) as the record with
that response, so roles, types and empty responses are checked exactly as
for SFT, and the pair is tokenized with the same templates and masks.
"""

import json
from dataclasses import dataclass
from typing import Union

from megatron.training.data.sft_formats import SFT_BAD_REASONS, BadRecord, Conversation, record_to_conversation

# Why a preference record is refused, with what to fix (preprocessing stops at the first one).
PREF_BAD_REASONS = {
    "invalid_utf8": "not valid UTF-8",
    "not_json": "not a JSON object",
    "missing_pair": "a preference record needs both 'chosen' and 'rejected' (TRL: prompt, chosen, rejected; "
                    "LLaMA-Factory: instruction, input, chosen, rejected; chat: message lists)",
    "missing_prompt": "no prompt: give 'prompt' (TRL), 'instruction' (LLaMA-Factory), or chosen/rejected message "
                      "lists that start with the shared conversation",
    "mixed_types": "'chosen' and 'rejected' must both be strings or both be message lists",
    "prompt_mismatch": "chosen and rejected conversations must be the same but for their last (assistant) message",
    "identical": "chosen and rejected are identical: a preference pair must differ",
    "too_long": "the pair does not fit --seq-length",
    **{k: v for k, v in SFT_BAD_REASONS.items() if k not in ("unknown_format", "missing_field", "empty")},
    "missing_field": "a required field is missing (LLaMA-Factory: instruction; chat: messages with role and "
                     "content)",
    "empty_response": "the chosen or the rejected response is empty",
}


class BadPair(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in PREF_BAD_REASONS, reason
        super().__init__(reason)
        self.reason, self.detail = reason, detail

    def describe(self) -> str:
        return PREF_BAD_REASONS[self.reason] + (f" ({self.detail})" if self.detail else "")


@dataclass
class PreferencePair:
    chosen: Conversation
    rejected: Conversation


def parse_preference_line(line: bytes) -> Union[PreferencePair, None]:
    """The pair of one jsonl line; None for a blank line; raises BadPair."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPair("invalid_utf8")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError:
        raise BadPair("not_json")
    if not isinstance(record, dict):
        raise BadPair("not_json")
    return record_to_pair(record)


def record_to_pair(record: dict) -> PreferencePair:
    if record.get("chosen") is None or record.get("rejected") is None:
        raise BadPair("missing_pair")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadPair("mixed_types")
    try:
        if isinstance(chosen, list):
            pair = _chat_pair(record, chosen, rejected)
        elif "instruction" in record:
            pair = PreferencePair(*(record_to_conversation(dict(record, output=r), "alpaca")
                                    for r in (chosen, rejected)))
        elif "prompt" in record:
            pair = PreferencePair(*(record_to_conversation({"input": record["prompt"], "target": r}, "panda")
                                    for r in (chosen, rejected)))
        else:
            raise BadPair("missing_prompt")
    except BadRecord as e:
        raise BadPair(e.reason)
    if pair.chosen.turns[-1] == pair.rejected.turns[-1]:
        raise BadPair("identical")
    return pair


def _chat_pair(record: dict, chosen: list, rejected: list) -> PreferencePair:
    prompt = record.get("prompt", [])
    if not isinstance(prompt, list):
        raise BadPair("mixed_types")
    sides = [record_to_conversation({"messages": prompt + side}, "chat") for side in (chosen, rejected)]
    if sides[0].turns[:-1] != sides[1].turns[:-1] or sides[0].system != sides[1].system:
        raise BadPair("prompt_mismatch")
    return PreferencePair(*sides)
