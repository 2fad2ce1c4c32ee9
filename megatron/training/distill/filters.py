"""Filters that drop empty or degenerate continuations before they reach training.

Each filter returns a reason (counted in the report) or None to keep:
- `empty`: nothing but whitespace;
- `too_short`: fewer generated tokens than `min_tokens`;
- `repetitive`: the share of repeated token n-grams is above `max_repetition`
  (a teacher stuck in a loop: "the the the ..." scores near 1; ordinary prose
  scores well under 0.2 for trigrams).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

FILTER_REASONS = ("empty", "too_short", "repetitive")


@dataclass
class FilterConfig:
    min_tokens: int = 16
    max_repetition: float = 0.5
    ngram: int = 3


def repetition_ratio(token_ids: Sequence[int], n: int = 3) -> float:
    """1 - distinct n-grams / all n-grams; 0 for fewer than n + 1 tokens."""
    total = len(token_ids) - n + 1
    if total < 2:
        return 0.0
    distinct = len({tuple(token_ids[i:i + n]) for i in range(total)})
    return 1.0 - distinct / total


def reject_reason(text: str, token_ids: Sequence[int], cfg: FilterConfig) -> Optional[str]:
    """Why the continuation is dropped (one of FILTER_REASONS), or None to keep it."""
    if not text.strip():
        return "empty"
    if len(token_ids) < cfg.min_tokens:
        return "too_short"
    if repetition_ratio(token_ids, cfg.ngram) > cfg.max_repetition:
        return "repetitive"
    return None
