"""Mixing synthetic data into continued pretraining.

1. The synthetic shards (their `text` field: prefix + continuation) become an
   indexed dataset through the data tools' `preprocess`, as any corpus does.
2. `synthetic_blend` writes the `--data-path` blend in which a chosen share of
   the sampled training tokens is synthetic.

Why the weights are what they are: megatron-core's BlendedDataset draws each
sample from the datasets in proportion to their normalized weights, and every
sample holds the same number of tokens (seq_length + 1), so a dataset's weight
is its share of the sampled tokens. The synthetic datasets get `fraction` in
total, the original ones `1 - fraction`; within each group a dataset's share is
its own weight when given ("W1 P1 W2 P2"), otherwise its token count read from
the `.idx` file, so every document is seen about equally often.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron.training.data.indexed_writer import read_index_header
from megatron.training.errors import UserError


class BlendError(UserError, ValueError):
    pass


def indexed_token_count(prefix: str) -> int:
    """Tokens stored in the indexed dataset `prefix` (the sum of its sequence lengths in the .idx)."""
    header = read_index_header(prefix)
    lengths = np.fromfile(header.path, dtype=np.int32, count=header.sequences, offset=header.lengths_offset)
    return int(lengths.sum(dtype=np.int64))


def parse_data_path(words: Sequence[str]) -> List[Tuple[Optional[float], str]]:
    """`P1 P2 ...` -> [(None, P1), ...]; `W1 P1 W2 P2 ...` -> [(W1, P1), ...]."""
    words = [w for item in words for w in item.split()]
    if not words:
        raise BlendError("the data path is empty: give dataset prefixes, or a blend \"W1 PREFIX1 W2 PREFIX2\"")

    def number(w):
        try:
            return float(w)
        except ValueError:
            return None

    if number(words[0]) is None:
        return [(None, w) for w in words]
    if len(words) % 2 or any(number(w) is None for w in words[::2]):
        raise BlendError(f"blend {' '.join(words)!r} must alternate weights and prefixes: \"W1 PREFIX1 W2 PREFIX2\"")
    return [(float(w), p) for w, p in zip(words[::2], words[1::2])]


@dataclass
class BlendEntry:
    weight: float
    prefix: str
    tokens: int
    synthetic: bool


def _group(items: List[Tuple[Optional[float], str]], share: float, synthetic: bool) -> List[BlendEntry]:
    tokens = [indexed_token_count(p) for _, p in items]
    given = [w for w, _ in items]
    if any(t == 0 for t in tokens):
        empty = [p for (_, p), t in zip(items, tokens) if t == 0]
        raise BlendError(f"{', '.join(empty)} holds no tokens: remove it from the blend")
    basis = given if given[0] is not None else tokens
    total = float(sum(basis))
    if total <= 0:
        raise BlendError("the blend weights sum to zero: give positive weights")
    return [BlendEntry(share * b / total, p, t, synthetic) for b, (_, p), t in zip(basis, items, tokens)]


def synthetic_blend(original: Sequence[str], synthetic: Sequence[str], fraction: float) -> List[BlendEntry]:
    """Blend entries in which `fraction` of the sampled tokens come from `synthetic`."""
    if not 0 < fraction < 1:
        raise BlendError(f"--synthetic-fraction {fraction} must lie between 0 and 1 (0.005 for 0.5%)")
    return (_group(parse_data_path(original), 1 - fraction, False)
            + _group(parse_data_path(synthetic), fraction, True))


def format_data_path(entries: Sequence[BlendEntry]) -> str:
    """The `--data-path` words: "W1 P1 W2 P2 ..."."""
    return " ".join(f"{e.weight:.8g} {e.prefix}" for e in entries)


def describe_blend(entries: Sequence[BlendEntry], train_tokens: Optional[int] = None) -> str:
    """A table of the blend; with `train_tokens`, how many times each dataset is read over the run."""
    lines = []
    for e in entries:
        kind = "synthetic" if e.synthetic else "original"
        line = f"{kind:<10} {e.weight:>10.4%} of samples  {e.tokens:>14,} tokens  {e.prefix}"
        if train_tokens:
            line += f"  ({e.weight * train_tokens / e.tokens:.2f} epochs)"
        lines.append(line)
    return "\n".join(lines)


def preprocess_synthetic(output_dir: str, output_prefix: str, tokenizer_type: str, tokenizer_model: Optional[str],
                         workers: int = 1, log=None) -> str:
    """Tokenize the `text` of every shard in OUT/shards/ into `{output_prefix}_text_document`
    (with end-of-document tokens, as pretraining data); returns that prefix."""
    from megatron.training.data.preprocess import PreprocessConfig, preprocess

    shards = os.path.join(output_dir, "shards")
    if not os.path.isdir(shards):
        raise BlendError(f"{output_dir} has no shards/ folder: run tools/generate_synthetic_data.py "
                         f"--output-dir {output_dir} first")
    cfg = PreprocessConfig(input=shards, output_prefix=output_prefix, tokenizer_type=tokenizer_type,
                           tokenizer_model=tokenizer_model, json_keys=["text"], append_eod=True, workers=workers)
    report = preprocess(cfg, log=log)
    if log:
        log(report.text())
    return cfg.output_name("text")
