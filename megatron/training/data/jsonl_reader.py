"""Streaming jsonl input for the data tools: which files, read in blocks of
whole lines, and each line turned into texts or a named reason to skip it.

The reader never holds more than one block (a few MB) of a file; blocks carry
the file name and the number of their first line, so a bad line is reported
as `file:line` by whoever parses it (a worker process).
"""

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from megatron.training.errors import UserError

# Reasons a line is skipped, in report order, and what the report says of each.
BAD_DESCRIPTIONS: Dict[str, str] = {
    "invalid_utf8": "not valid UTF-8",
    "not_json": "not a JSON object",
    "missing_key": "lacks a --json-keys key",
    "not_text": "value is not a string",
    "bad_tokens": "text the tokenizer cannot encode (NullTokenizer: whole ids in [0, --vocab-size))",
    "empty": "empty text",
}
BAD_REASONS = tuple(BAD_DESCRIPTIONS)

# --json-format: how a record becomes the text of each --json-keys dataset.
# "title_content" is PandaLLM's pretraining record: title and content joined
# by a newline into one document, stored as the dataset key "text".
TITLE_CONTENT_SEPARATOR = "\n"
JSON_FORMATS = ("keys", "title_content")


class InputError(UserError, ValueError):
    pass


@dataclass
class Block:
    path: str
    first_line: int  # 1-based number of the block's first line in its file
    first_index: int  # 0-based index of the first line over all input files
    data: bytes  # whole lines, each ending in b"\n" (except maybe a file's last)


def find_input_files(spec: str) -> List[str]:
    """A file, a folder (its *.jsonl, *.json and *.jsonl.gz files), or a glob;
    sorted so the order of documents does not depend on the file system."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec)
                 if n.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = [p for p in glob.glob(spec) if os.path.isfile(p)]
    if not files:
        raise InputError(
            f"--input {spec} matches no file: give a .jsonl or .jsonl.gz file, a folder holding "
            "them, or a quoted glob such as 'data/*.jsonl'"
        )
    return sorted(files)


def read_blocks(paths: Sequence[str], block_bytes: int = 1 << 20,
                damaged: Optional[List[str]] = None) -> Iterator[Block]:
    """Yield blocks of about `block_bytes` of whole lines from each file in
    turn. A compressed file that ends early or is corrupt keeps every line
    read before the damage; a sentence saying so is appended to `damaged`
    (without a list, the damage is an InputError)."""
    index = 0
    for path in paths:
        line_no = 1
        pending: List[bytes] = []  # the start of a line longer than the chunks read so far
        failure: List[str] = []
        for chunk in _chunks(path, block_bytes, failure):
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading it
                pending.append(chunk)
                continue
            data = b"".join(pending + [chunk[:cut]]) if pending else chunk[:cut]
            pending = [chunk[cut:]] if cut < len(chunk) else []
            lines = data.count(b"\n")
            yield Block(path, line_no, index, data)
            line_no += lines
            index += lines
        if pending:
            yield Block(path, line_no, index, b"".join(pending))
            index += 1
        if failure:
            message = (f"{path} is damaged ({failure[0]}) after line {line_no - 1}: the lines before it were kept, "
                       "the rest of the file is lost; re-create or re-download it to use all of it")
            if damaged is None:
                raise InputError(message)
            damaged.append(message)


def _chunks(path: str, size: int, failure: List[str]) -> Iterator[bytes]:
    """The bytes of `path` (decompressed for .gz) in chunks of about `size`.
    A damaged .gz stops early with its error in `failure`; the chunks read
    from it before are all there is (read1 returns what each step decompressed)."""
    compressed = path.endswith(".gz")
    try:
        f = gzip.open(path, "rb") if compressed else open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read --input file {path}: {e.strerror}")
    with f:
        if not compressed:
            while True:
                chunk = f.read(size)
                if not chunk:
                    return
                yield chunk
        parts, have = [], 0
        while True:
            try:
                piece = f.read1(size)
            except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad header (BadGzipFile), bad data
                failure.append(str(e) or type(e).__name__)
                piece = b""
            if piece:
                parts.append(piece)
                have += len(piece)
            if parts and (have >= size or not piece):
                yield b"".join(parts)
                parts, have = [], 0
            if not piece:
                return


def split_lines(data: bytes) -> List[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def parse_record(line: bytes, keys: Sequence[str], json_format: str) -> Union[str, Dict[str, Union[str, list]]]:
    """The texts of one jsonl line by dataset key, or the reason (one of
    BAD_REASONS) to skip it. A list of strings is taken as the document
    already split into sentences, as Megatron-LM does."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        record = json.loads(text)
    except ValueError:
        return "not_json" if text.strip() else "empty"
    if not isinstance(record, dict):
        return "not_json"
    if json_format == "title_content":
        if "title" not in record and "content" not in record:
            return "missing_key"
        parts = [record.get("title") or "", record.get("content") or ""]
        if not all(isinstance(p, str) for p in parts):
            return "not_text"
        record = {"text": TITLE_CONTENT_SEPARATOR.join(p for p in parts if p)}
    out = {}
    for key in keys:
        if key not in record:
            return "missing_key"
        value = record[key]
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                return "not_text"
            if not any(value):
                return "empty"
        elif not isinstance(value, str):
            return "not_text"
        elif not value:
            return "empty"
        out[key] = value
    return out


def bad_summary(counts: Dict[str, int], examples: Dict[str, List[Tuple[str, int]]],
                reasons: Dict[str, str]) -> Optional[str]:
    """One line per reason with its first locations, or None when all lines were good.
    `reasons` maps reason -> description, in report order (BAD_DESCRIPTIONS for this reader)."""
    width = max(13, max(len(r) for r in reasons) + 1)
    lines = []
    for reason, description in reasons.items():
        n = counts.get(reason, 0)
        if n:
            where = ", ".join(f"{p}:{ln}" for p, ln in examples.get(reason, [])[:3])
            lines.append(f"  {reason:<{width}}{n:>10,}  ({description}; first at {where})")
    return "\n".join(lines) if lines else None
