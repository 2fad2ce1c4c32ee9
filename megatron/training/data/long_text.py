"""Very long texts tokenized in pieces, in bounded memory, with exactly the
ids of tokenizing them whole.

Tokenizing a 50 MB text in one call holds the tokenizer's own buffers and a
Python list of every id at once: 2.2 GB with sentencepiece. Texts longer
than `LONG_TEXT_CHARS` are therefore cut into pieces of about that size, each
tokenized alone (ids kept as a compact numpy array), and the pieces'
ids concatenated.

Where a text may be cut: at a single space between two non-space characters
(a "seam"). The tokenizers used here never merge across such a space, but
they treat the start of an input specially, so the space goes either
- "keep": to the start of the right piece (byte-level BPE: GPT-2, Llama 3,
  where " word" is one pre-token), or
- "drop": nowhere, because the tokenizer puts a word-start marker before every
  input (sentencepiece's dummy prefix, HF's Prepend("▁") normalizer), which
  stands for the space.
Which rule holds is found on the first long text by trying both on its first
seams, and every seam is then checked as it is cut: the text around it
(`_CHECK_CHARS` each side) tokenized as one must equal its two halves
tokenized apart. A seam that fails the check is not used (the next one is
tried), so the concatenation is the whole text's tokenization. A tokenizer for
which no rule holds, or a text without a usable seam, is tokenized whole, as
before (memory then grows with the text).

Special tokens a tokenizer adds to every text (Llama 2's BOS, an HF
tokenizer's BOS/EOS) are found by tokenizing "" and "x", kept once at the
ends, and stripped from the pieces.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np

LONG_TEXT_CHARS = 1_000_000  # Megatron-LM's own piece size when it splits sentences
_CHECK_CHARS = 2_000
_SEAMS_TO_PROBE = 3
_SEAM_TRIES = 16
RULES = ("keep", "drop")


def tokenize_texts(tok, texts: Sequence[str], dtype, long_chars: int = LONG_TEXT_CHARS) -> list:
    """`tok.tokenize_batch(texts)`, except that texts longer than `long_chars`
    come back as numpy arrays of `dtype` tokenized piece by piece (same ids)."""
    long = [i for i, t in enumerate(texts) if len(t) > long_chars]
    if not long:
        return tok.tokenize_batch(list(texts))
    skip = set(long)
    short = iter(tok.tokenize_batch([t for i, t in enumerate(texts) if i not in skip]))
    return [tokenize_long(tok, t, dtype, long_chars) if i in skip else next(short) for i, t in enumerate(texts)]


class _Plan:
    """How one tokenizer is cut: the special tokens it adds around every text and the seam rule."""

    def __init__(self, head: List[int], tail: List[int], rule: Optional[str] = None):
        self.head, self.tail, self.rule = head, tail, rule


def tokenize_long(tok, text: str, dtype, piece_chars: int = LONG_TEXT_CHARS) -> np.ndarray:
    """The ids of `tok.tokenize_batch([text])[0]` as a numpy array of `dtype`,
    computed in pieces of about `piece_chars` characters (module docstring)."""
    plan = _plan(tok, text, piece_chars)
    if plan is None:
        return np.asarray(tok.tokenize_batch([text])[0], dtype=dtype)
    parts = [np.asarray(plan.head, dtype=dtype)]
    start = 0
    while len(text) - start > piece_chars:
        seam = _next_seam(tok, plan, text, start, piece_chars)
        if seam is None:
            break
        piece = _raw(tok, plan, text[start:seam])
        if piece is None:
            return np.asarray(tok.tokenize_batch([text])[0], dtype=dtype)
        parts.append(np.asarray(piece, dtype=dtype))
        start = seam if plan.rule == "keep" else seam + 1
    last = _raw(tok, plan, text[start:])
    if last is None:
        return np.asarray(tok.tokenize_batch([text])[0], dtype=dtype)
    parts += [np.asarray(last, dtype=dtype), np.asarray(plan.tail, dtype=dtype)]
    return np.concatenate(parts)


def _added_tokens(tok) -> Optional[Tuple[List[int], List[int]]]:
    """(head, tail): the ids a tokenizer adds before and after every text."""
    empty, one = tok.tokenize_batch(["", "0"])
    for k in range(len(empty), -1, -1):
        head, tail = list(empty[:k]), list(empty[k:])
        if one[:k] == head and (not tail or one[len(one) - len(tail):] == tail) and len(one) > len(empty):
            return head, tail
    return None


def _raw(tok, plan: _Plan, text: str) -> Optional[list]:
    """The ids of `text` without the added head/tail; None when they are not where expected."""
    ids = tok.tokenize_batch([text])[0]
    h, t = len(plan.head), len(plan.tail)
    if list(ids[:h]) != plan.head or (t and list(ids[len(ids) - t:]) != plan.tail) or len(ids) < h + t:
        return None
    return ids[h:len(ids) - t]


def _is_seam(text: str, c: int) -> bool:
    return 0 < c < len(text) - 1 and text[c] == " " and not text[c - 1].isspace() and not text[c + 1].isspace()


def _seam_holds(tok, plan: _Plan, rule: str, text: str, start: int, c: int) -> bool:
    """Whether cutting at the space at `c` under `rule` leaves the ids of the
    text around it unchanged."""
    lo, hi = max(start, c - _CHECK_CHARS), min(len(text), c + 1 + _CHECK_CHARS)
    whole = _raw(tok, plan, text[lo:hi])
    left = _raw(tok, plan, text[lo:c])
    right = _raw(tok, plan, text[c if rule == "keep" else c + 1:hi])
    return None not in (whole, left, right) and list(whole) == list(left) + list(right)


def _candidates(text: str, start: int, piece_chars: int):
    """Seams to try for a piece starting at `start`: backwards from its
    intended end down to half its size, then forwards beyond it."""
    end = start + piece_chars
    c = text.rfind(" ", start + piece_chars // 2, end)
    while c != -1:
        if _is_seam(text, c):
            yield c
        c = text.rfind(" ", start + piece_chars // 2, c)
    c = text.find(" ", end)
    while c != -1:
        if _is_seam(text, c):
            yield c
        c = text.find(" ", c + 1)


def _next_seam(tok, plan: _Plan, text: str, start: int, piece_chars: int) -> Optional[int]:
    for tries, c in enumerate(_candidates(text, start, piece_chars)):
        if tries >= _SEAM_TRIES:
            return None
        if _seam_holds(tok, plan, plan.rule, text, start, c):
            return c
    return None


def _plan(tok, text: str, piece_chars: int) -> Optional[_Plan]:
    """The tokenizer's cutting plan (cached on it once a rule is found), or
    None when it cannot be cut safely."""
    cached = getattr(tok, "_long_text_plan", None)
    if cached is not None:
        return cached
    added = _added_tokens(tok)
    if added is None:
        return None
    plan = _Plan(*added)
    seams = []
    for c in _candidates(text, 0, piece_chars):
        seams.append(c)
        if len(seams) == _SEAMS_TO_PROBE:
            break
    for rule in RULES:
        if seams and all(_seam_holds(tok, plan, rule, text, 0, c) for c in seams):
            plan.rule = rule
            tok._long_text_plan = plan
            return plan
    return None
