"""Sequence classification data and metrics for BERT-family encoders
(finetune_classification.py).

Files: jsonl, one record per line, either {"text"[, "text_b"], "label"}
or FinGPT's instruction format {"instruction", "input", "output"} (the text
is the input, the label the normalised output, as tasks/classification.py
reads it). A file may not mix the two. Labels are --labels in that order, or
the sorted labels of the training files.

Examples are encoded as the model's own Hugging Face tokenizer encodes a
text (pair) with its special tokens ([CLS] a [SEP] b [SEP]; RoBERTa's
<s> a </s></s> b </s>), truncated to --seq-length and right-padded with the
pad id, so the exported HF classifier sees exactly these inputs.

Metrics come from counts that the loss function reports per micro-batch
(`batch_counts`) and the driver averages over micro-batches and data-parallel
ranks: ratios of averages are ratios of sums, so `metrics_from_counts` gives
the exact accuracy and macro-F1 (the mean F1 over the labels that occur as
gold or prediction) of the whole held-out file.
"""

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tasks.classification import jsonl_records, normalise_label, read_fingpt_jsonl
from tasks.lm import EvalError
from tasks.scoring import precision_recall_f1

IGNORE = -1  # the label of padding examples (no loss, not counted)


@dataclasses.dataclass
class Record:
    text: str
    text_b: Optional[str]
    label: str
    source: str  # file:line


def read_records(path: str) -> List[Record]:
    """The records of one jsonl file (module doc); a malformed line is an error naming it."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file: --train-data / --valid-data take jsonl files of "
                        '{"text"[, "text_b"], "label"} or FinGPT\'s {"instruction", "input", "output"} records')
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise EvalError(f"{path}: no records")
    try:
        keys = set(json.loads(first))
    except ValueError as e:
        raise EvalError(f"{path}: the first record is not JSON ({e})")
    if {"instruction", "input", "output"} <= keys:
        examples, _, problems = read_fingpt_jsonl(path)
        if problems:
            raise EvalError(f"{problems[0]} ({len(problems)} malformed lines)")
        return [Record(e.input, None, e.label, e.source) for e in examples]
    records = []
    for source, r, problem in jsonl_records(path):
        if problem:
            raise EvalError(f"{source}: {problem}")
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or "label" not in r \
                or not isinstance(r.get("text_b", ""), str):
            raise EvalError(f'{source}: a record needs "text" (str), "label" and optionally "text_b" (str), '
                            'or FinGPT\'s "instruction", "input", "output"')
        records.append(Record(r["text"], r.get("text_b"), normalise_label(str(r["label"])), source))
    return records


def read_files(paths: Sequence[str]) -> List[Record]:
    return [r for path in paths for r in read_records(path)]


def label_set(records: List[Record], labels: Optional[str]) -> List[str]:
    """--labels (comma-separated, in class order) or the sorted labels of `records`;
    every record's label must be among them."""
    names = [normalise_label(x) for x in labels.split(",")] if labels else sorted({r.label for r in records})
    if len(names) < 2:
        raise EvalError(f"only the label {names} occurs in the training data: give the label set with --labels a,b,c")
    unknown = next((r for r in records if r.label not in names), None)
    if unknown is not None:
        raise EvalError(f"{unknown.source}: label {unknown.label!r} is not one of --labels {','.join(names)}")
    return names


def encode(tokenizer, records: List[Record], labels: List[str], seq_length: int,
           token_types: bool) -> Dict[str, np.ndarray]:
    """text [n, seq], types [n, seq] (0 without token types), padding_mask, label [n]."""
    hf = tokenizer.hf_tokenizer
    pairs = [r.text_b is not None for r in records]
    if any(pairs) and not all(pairs):
        raise EvalError("some records have text_b and others not: give every record of a file the same fields")
    encoded = hf([r.text for r in records], [r.text_b for r in records] if any(pairs) else None,
                 truncation=True, max_length=seq_length)
    n = len(records)
    text = np.full((n, seq_length), tokenizer.pad, dtype=np.int64)
    types = np.zeros((n, seq_length), dtype=np.int64)
    mask = np.zeros((n, seq_length), dtype=np.int64)
    for i, ids in enumerate(encoded["input_ids"]):
        text[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        if token_types and "token_type_ids" in encoded:
            types[i, :len(ids)] = encoded["token_type_ids"][i]
    index = {name: i for i, name in enumerate(labels)}
    return {"text": text, "types": types, "padding_mask": mask,
            "label": np.array([index[r.label] for r in records], dtype=np.int64)}


class ClassificationDataset(torch.utils.data.Dataset):
    """Encoded examples read in epochs: epoch e is a permutation drawn from
    numpy's generator seeded with (seed, e), wrapped to a whole number of
    global batches (`epoch_length`), the same on every rank and on resume.
    `shuffle=False` (held-out data): the file order once, padded with
    IGNORE examples to a whole number of global batches."""

    def __init__(self, arrays: Dict[str, np.ndarray], global_batch_size: int, samples: Optional[int] = None,
                 seed: int = 0, shuffle: bool = True):
        """`samples`: how many the run reads (default: one epoch)."""
        self.arrays, self.seed, self.shuffle = arrays, seed, shuffle
        self.examples = len(arrays["label"])
        self.epoch_length = math.ceil(self.examples / global_batch_size) * global_batch_size
        self.epochs = math.ceil(samples / self.epoch_length) if samples else 1
        self._order = (None, None)  # (epoch, its permutation)

    def __len__(self) -> int:
        return self.epoch_length * self.epochs

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        epoch, position = divmod(idx, self.epoch_length)
        if not self.shuffle:
            if position >= self.examples:  # padding: any input, no label
                return dict({k: v[0] for k, v in self.arrays.items()}, label=np.int64(IGNORE))
            return {k: v[position] for k, v in self.arrays.items()}
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.examples))
        i = self._order[1][position % self.examples]
        return {k: v[i] for k, v in self.arrays.items()}


def batch_counts(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-micro-batch sums for `metrics_from_counts`: examples, correct, loss
    sum, and per class c true positives, predictions and gold labels."""
    valid = labels != IGNORE
    predicted = logits.argmax(dim=-1)
    out = {"examples": valid.sum().float(), "correct": ((predicted == labels) & valid).sum().float(),
           "loss sum": (losses * valid).sum().detach().float()}
    for c in range(logits.shape[-1]):
        out[f"tp {c}"] = ((predicted == c) & (labels == c) & valid).sum().float()
        out[f"predicted {c}"] = ((predicted == c) & valid).sum().float()
        out[f"gold {c}"] = ((labels == c) & valid).sum().float()
    return out


def metrics_from_counts(counts: Dict[str, float]) -> Dict[str, float]:
    """classification loss, accuracy and macro-F1 from (averaged) `batch_counts`."""
    examples = counts["examples"]
    classes = sorted(int(k.split()[1]) for k in counts if k.startswith("gold "))
    f1 = [precision_recall_f1(counts[f"tp {c}"], counts[f"predicted {c}"], counts[f"gold {c}"])["f1"]
          for c in classes if counts[f"gold {c}"] or counts[f"predicted {c}"]]
    return {"classification loss": counts["loss sum"] / examples, "accuracy": counts["correct"] / examples,
            "macro F1": sum(f1) / len(f1) if f1 else 0.0}


def data_summary(name: str, records: List[Record], labels: List[str]) -> str:
    counts = {label: 0 for label in labels}
    for r in records:
        counts[r.label] += 1
    return f"> {name}: {len(records):,} examples (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")"


def epoch_schedule(train_examples: int, valid_examples: int, global_batch_size: int,
                   epochs: int) -> Tuple[int, int, int]:
    """(training iterations, iterations per epoch, evaluation iterations covering the held-out file once)."""
    per_epoch = math.ceil(train_examples / global_batch_size)
    return per_epoch * epochs, per_epoch, math.ceil(valid_examples / global_batch_size)
