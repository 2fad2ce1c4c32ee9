"""Conversion between megatron-core indexed datasets and nanoGPT-style flat
token files (`train.bin` / `val.bin`: uint16 token ids, documents simply
concatenated, usually each ending in the end-of-text token).

- to nanoGPT: the documents of a dataset in order, the last `val_fraction` of
  them into val.bin (at least one when the fraction is > 0), the rest into
  train.bin. Ids must fit uint16.
- from nanoGPT: a flat file cut into documents after each `eod` token (kept,
  as `--append-eod` keeps it), or into `chunk_tokens`-long documents when the
  data has no end-of-document token.
Both stream in chunks; memory does not grow with the data.
"""

import os
from typing import Optional

import numpy as np

from megatron.training.data.indexed_writer import DatasetFormatError, IndexedDatasetWriter, read_index_header
from megatron.training.fileio import remove_quietly, sweep_stale_temps, temp_name

_CHUNK_TOKENS = 1 << 22


def to_nanogpt(prefix: str, out_dir: str, val_fraction: float = 0.0005) -> dict:
    """Write `out_dir/train.bin` and `out_dir/val.bin`; returns token counts."""
    header = read_index_header(prefix)
    if np.dtype(header.dtype).itemsize > 2 and header.dtype != np.int32:
        raise DatasetFormatError(f"{prefix}.idx stores {header.dtype.__name__}: not token ids")
    with open(prefix + ".idx", "rb") as f:
        f.seek(header.pointers_offset)
        pointers = np.fromfile(f, dtype=np.int64, count=header.sequences)
        doc_index = np.fromfile(f, dtype=np.int64, count=header.documents + 1)
    n_val = int(round(header.documents * val_fraction))
    if val_fraction > 0:
        n_val = max(1, n_val)
    if header.documents - n_val < 1:
        raise DatasetFormatError(f"{prefix} has {header.documents} documents: too few for --val-fraction {val_fraction}")
    itemsize = np.dtype(header.dtype).itemsize
    first_val_seq = doc_index[header.documents - n_val]
    split_token = (pointers[first_val_seq] // itemsize) if first_val_seq < header.sequences else \
        os.path.getsize(prefix + ".bin") // itemsize
    os.makedirs(out_dir, exist_ok=True)
    for name in ("train", "val"):
        sweep_stale_temps(out_dir, f"{name}.bin.")
    data = np.memmap(prefix + ".bin", dtype=header.dtype, mode="r")
    counts = {}
    for name, lo, hi in (("train", 0, int(split_token)), ("val", int(split_token), data.size)):
        path = os.path.join(out_dir, f"{name}.bin")
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as out:
                for s in range(lo, hi, _CHUNK_TOKENS):
                    chunk = np.asarray(data[s:min(hi, s + _CHUNK_TOKENS)])
                    if chunk.size and (chunk.max() > 65535 or chunk.min() < 0):
                        raise DatasetFormatError(
                            f"{prefix}.bin holds ids above 65535: nanoGPT's uint16 files cannot store them")
                    out.write(chunk.astype(np.uint16).tobytes())
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise
        counts[name] = hi - lo
    return counts


def from_nanogpt(path: str, output_prefix: str, eod: Optional[int], chunk_tokens: int = 2048,
                 vocab_size: Optional[int] = None) -> IndexedDatasetWriter:
    """Read a flat uint16 file into `{output_prefix}.bin/.idx` (dtype uint16,
    or int32 when `vocab_size` >= 65,500, as preprocess_data would write)."""
    from megatron.training.data.indexed_writer import optimal_dtype

    if eod is None and chunk_tokens < 1:
        raise DatasetFormatError("give --eod-token ID, or --chunk-tokens N > 0 for data without one")
    if not os.path.isfile(path) or os.path.getsize(path) < 2:
        raise DatasetFormatError(f"--input {path} is missing or holds no token: give a nanoGPT train.bin or val.bin")
    if os.path.getsize(path) % 2:
        raise DatasetFormatError(f"--input {path} has an odd number of bytes: not a file of uint16 token ids "
                                 "(truncated?)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    writer = IndexedDatasetWriter(output_prefix, optimal_dtype(vocab_size if vocab_size else 65535))
    try:
        carry = np.zeros(0, np.uint16)
        for s in range(0, data.size, _CHUNK_TOKENS):
            buf = np.concatenate((carry, np.asarray(data[s:s + _CHUNK_TOKENS])))
            if eod is not None:
                ends = np.flatnonzero(buf == eod) + 1
            else:
                ends = np.arange(chunk_tokens, buf.size + 1, chunk_tokens)
            cut = int(ends[-1]) if ends.size else 0
            _add_docs(writer, buf[:cut], ends)
            carry = buf[cut:]
        if carry.size:
            _add_docs(writer, carry, np.array([carry.size]))
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return writer


def _add_docs(writer: IndexedDatasetWriter, tokens: np.ndarray, ends: np.ndarray) -> None:
    if not ends.size:
        return
    lengths = np.diff(np.concatenate(([0], ends))).astype(np.int32)
    writer.add_documents(tokens, lengths, np.ones(lengths.size, np.int64))
