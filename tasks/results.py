"""Result files: an append-only partial file that lets an interrupted run
resume, the final JSON, and markdown tables.

The partial file is jsonl: a first line {"settings": {...}} and then one
record per scored item, flushed as it is written. A run restarted with the
same settings skips the items already there; different settings are an error
(the numbers would mix two evaluations).
"""

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

from megatron.training.fileio import append_synced, atomic_write_text
from tasks.lm import EvalError


class PartialResults:
    """Per-item records keyed by `record["key"]`; only `writer` writes."""

    def __init__(self, path: str, settings: dict, writer: bool = True):
        self.path = path
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.writer = writer
        self.records: Dict[str, dict] = {}
        error = None
        if writer:
            try:
                self._open()
            except EvalError as e:
                error = str(e)
        # Under torchrun every rank must skip the same items: the writer's view wins.
        error, self.records = _from_writer((error, self.records))
        if error:
            raise EvalError(error)

    def _open(self) -> None:
        if os.path.exists(self.path):
            self._read()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"settings": self.settings}, ensure_ascii=False) + "\n")

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            saved = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, IndexError):
            raise EvalError(f"{self.path}:1: not a partial results file of this tool: remove it or choose "
                            "another --results-file")
        if saved != self.settings:
            diff = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            raise EvalError(f"{self.path} was written with other settings ({', '.join(diff)} differ): rerun with "
                            "the same flags to resume, or remove the file to start over")
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines) or not any(x.strip() for x in lines[number:]):
                    break  # the last line of an interrupted write
                raise EvalError(f"{self.path}:{number}: unreadable record: remove the file to start over")
            self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, records: Iterable[dict]) -> None:
        records = list(records)
        for r in records:
            self.records[r["key"]] = r
        if self.writer and records:
            append_synced(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _from_writer(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_json(path: str, data: dict) -> None:
    """Written aside and renamed: a reader never sees half a file."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def markdown_table(header: Sequence[str], rows: List[Sequence], align: Optional[str] = None) -> str:
    """A GitHub markdown table; `align` is one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":") for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]]) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)
