"""Source documents for synthetic-data generation and the prompts cut from them.

A document is read from jsonl (one record a line, streamed with the data
tools' reader) or from an indexed dataset (`.bin/.idx`, detokenized with the
tokenizer that wrote it). Every document carries a stable id: the record's
`--id-key` value, else `file:line`; for an indexed dataset, its index. The ids
are what resuming and the provenance of every output are keyed on.

A prompt is the document's prefix, cut by the teacher's tokens or by
characters; documents shorter than the minimum length are skipped and counted.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import numpy as np

from megatron.training.data.jsonl_reader import InputError, find_input_files, parse_record, read_blocks, split_lines
from megatron.training.errors import ArgumentError

PREFIX_UNITS = ("tokens", "chars")


@dataclass
class Document:
    id: str
    text: str


@dataclass
class Prompt:
    """What the teacher continues: `token_ids` (the teacher's, with its BOS
    when it uses one) encode `prefix`, the cut text."""

    doc_id: str
    prefix: str
    token_ids: List[int]
    prefix_tokens: int  # tokens of the prefix itself, without BOS


@dataclass
class SourceStats:
    """Input lines or documents that gave no prompt, by reason."""

    skipped: Dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def iter_jsonl_documents(spec: str, stats: SourceStats, text_key: str = "text",
                         id_key: Optional[str] = "id") -> Iterator[Document]:
    """Documents of a jsonl file, folder or glob, in a fixed order. Bad lines
    are skipped and counted under the data tools' reasons."""
    seen = set()
    for block in read_blocks(find_input_files(spec)):
        for i, line in enumerate(split_lines(block.data)):
            rec = parse_record(line, [text_key], "keys")
            if isinstance(rec, str):
                stats.skip(rec)
                continue
            text = rec[text_key]
            text = "".join(text) if isinstance(text, list) else text
            raw_id = json.loads(line).get(id_key) if id_key else None
            doc_id = str(raw_id) if raw_id is not None else f"{os.path.basename(block.path)}:{block.first_line + i}"
            if doc_id in seen:
                raise InputError(
                    f"{block.path}:{block.first_line + i}: document id {doc_id!r} appears twice; ids must be "
                    f"unique to resume safely: fix the '{id_key}' values, or pass --id-key '' to use file:line ids")
            seen.add(doc_id)
            yield Document(doc_id, text)


def iter_indexed_documents(prefix: str, tokenizer) -> Iterator[Document]:
    """Documents of an indexed dataset as text, without their end-of-document
    tokens; the id is the document's index."""
    from megatron.training.data.indexed_writer import checked_indexed_dataset

    ds = checked_indexed_dataset(prefix)
    bounds = ds.document_indices
    eod = getattr(tokenizer, "eod", None)
    for d in range(len(bounds) - 1):
        parts = [np.asarray(ds[s]) for s in range(bounds[d], bounds[d + 1])]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if eod is not None:
            ids = ids[ids != eod]
        yield Document(str(d), tokenizer.detokenize(ids.tolist()))


@dataclass
class PrefixConfig:
    unit: str = "tokens"  # one of PREFIX_UNITS
    length: int = 128  # prefix length in `unit`
    min_doc_length: Optional[int] = None  # in `unit`; default: `length`
    add_bos: bool = True  # prepend the teacher's BOS (when it has one)

    def __post_init__(self):
        if self.unit not in PREFIX_UNITS:
            raise ArgumentError(f"--prefix-unit {self.unit!r}: choose one of {', '.join(PREFIX_UNITS)}")
        if self.length < 1:
            raise ArgumentError(f"--prefix-length {self.length}: give a positive length")
        if self.min_doc_length is None:
            self.min_doc_length = self.length
        if self.min_doc_length < self.length:
            raise ArgumentError(f"--min-doc-length {self.min_doc_length} is below --prefix-length {self.length}: "
                                "a document must hold a whole prefix; raise --min-doc-length or drop it")


class PrefixCutter:
    """Cuts prompts from documents with the teacher's tokenizer (a transformers tokenizer)."""

    def __init__(self, cfg: PrefixConfig, tokenizer, stats: SourceStats):
        self.cfg = cfg
        self.tok = tokenizer
        self.stats = stats
        self.bos = [tokenizer.bos_token_id] if cfg.add_bos and tokenizer.bos_token_id is not None else []

    def encode(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def cut(self, doc: Document) -> Optional[Prompt]:
        """The prompt for `doc`, or None (counted as `short_document`) when it is too short."""
        cfg = self.cfg
        if cfg.unit == "chars":
            if len(doc.text) < cfg.min_doc_length:
                self.stats.skip("short_document")
                return None
            prefix = doc.text[:cfg.length]
            ids = self.encode(prefix)
        else:
            ids = self.encode(doc.text)
            if len(ids) < cfg.min_doc_length:
                self.stats.skip("short_document")
                return None
            ids = ids[:cfg.length]
            prefix = self.tok.decode(ids)
        return Prompt(doc.id, prefix, self.bos + ids, len(ids))
