"""Streaming writer and merger for megatron-core's indexed datasets
(`{prefix}.bin` + `{prefix}.idx`), byte-identical to what megatron-core's
`IndexedDatasetBuilder` writes, in flat memory.

`IndexedDatasetBuilder` keeps every sequence length and document boundary in
Python lists until `finalize`; for a 1 TB corpus that alone is tens of GB.
Here they go to two scratch files next to the output and the `.idx` is
assembled from them in fixed-size chunks at the end.

The two halves can never be mismatched: everything is written under
temporary names (`fileio.temp_name`) and fsynced; then the old `.idx` is
removed, the new `.bin` renamed into place, and the new `.idx` last. A kill
between those steps leaves a `.bin` without an `.idx`, which every reader
rejects as incomplete, never a new `.bin` beside an old `.idx`. Readers
(`read_index_header`, used by merge, the nanoGPT conversion, the blend
builder, the driver's data check, the SFT and perplexity readers) also check
that the `.bin` holds exactly the bytes the `.idx` describes, which catches a
pair assembled by hand from two runs, a truncated copy, or a reader racing a
rewrite. On any failure, a full disk included, the temporary files are
removed; those of killed runs are swept by the next writer of the same output.

The `.idx` layout (megatron-core `_IndexWriter`, little endian):
    b"MMIDIDX\\x00\\x00", u64 version=1, u8 dtype code,
    u64 sequence count S, u64 document count D+1,
    i32[S] sequence lengths, i64[S] byte offsets, i64[D+1] document indices
    (sequence index at which each document ends, starting with 0).
"""

import os
import shutil
import struct
from typing import Iterable, List, Optional, Tuple

import numpy as np

from megatron.training.errors import UserError
from megatron.training.fileio import fsync_dir, remove_quietly, sweep_stale_temps, temp_name

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (indexed_dataset.DType)
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # entries per chunk when assembling the index


class DatasetFormatError(UserError, ValueError):
    """An indexed dataset that cannot be read or written as asked; the message names the file and the fix."""


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """megatron-core's `DType.optimal_dtype`: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Append documents to `{prefix}.bin/.idx`; `finalize()` makes them
    visible, `abort()` removes every partial file."""

    def __init__(self, prefix: str, dtype: type):
        self.prefix = prefix
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise DatasetFormatError(f"dtype {dtype} cannot be stored in an indexed dataset")
        folder, base = os.path.split(os.path.abspath(prefix))
        sweep_stale_temps(folder, base + ".")
        self._bin_tmp = temp_name(prefix + ".bin")
        self._idx_tmp = temp_name(prefix + ".idx")
        self._lengths_tmp = temp_name(prefix + ".lengths")
        self._docs_tmp = temp_name(prefix + ".docs")
        self._files = []
        self._placed_bin = False  # the new .bin carries its final name, the .idx not yet
        try:
            self._bin, self._lengths, self._docs = (self._open(p) for p in (
                self._bin_tmp, self._lengths_tmp, self._docs_tmp))
        except BaseException:
            self.abort()
            raise
        self.sequences = 0
        self.documents = 0
        self.tokens = 0

    def _open(self, path: str) -> "_OutputFile":
        f = _OutputFile(path)
        self._files.append(f)
        return f

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray, doc_sequences: np.ndarray) -> None:
        """Append documents given as flat arrays: all their tokens, the length
        of every sequence (sentence), and how many sequences each document has."""
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        self._bin.write(tokens.tobytes())
        self._lengths.write(np.asarray(sequence_lengths, dtype=np.int32).tobytes())
        ends = self.sequences + np.cumsum(doc_sequences, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.sequences += int(len(sequence_lengths))
        self.documents += int(len(doc_sequences))
        self.tokens += int(tokens.size)

    def add_document(self, tokens: Iterable[int], sequence_lengths: Optional[List[int]] = None) -> None:
        arr = np.asarray(list(tokens), dtype=self.dtype)
        lengths = [arr.size] if sequence_lengths is None else sequence_lengths
        self.add_documents(arr, np.asarray(lengths, np.int32), np.asarray([len(lengths)], np.int64))

    def add_dataset(self, prefix: str) -> None:
        """Append a whole finished dataset (streaming copy, for merging)."""
        header = read_index_header(prefix)
        if header.dtype != self.dtype:
            raise DatasetFormatError(
                f"{prefix}.idx stores {np.dtype(header.dtype).name} but the merged dataset is "
                f"{np.dtype(self.dtype).name}: merge only datasets made with tokenizers of the same "
                "vocabulary size class (all < 65,500 ids, or all above)"
            )
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        with open(prefix + ".idx", "rb") as f:
            f.seek(header.lengths_offset)
            _copy_bytes(f, self._lengths, 4 * header.sequences)
            f.seek(header.doc_indices_offset + 8)  # skip the leading 0
            remaining = header.documents
            while remaining:
                n = min(remaining, _CHUNK)
                ends = np.frombuffer(f.read(8 * n), dtype=np.int64) + self.sequences
                self._docs.write(ends.tobytes())
                remaining -= n
        self.sequences += header.sequences
        self.documents += header.documents
        self.tokens += os.path.getsize(prefix + ".bin") // np.dtype(self.dtype).itemsize

    def finalize(self) -> Tuple[str, str]:
        """Write the `.idx`, rename both files into place; returns their paths.
        On failure the caller calls `abort()`."""
        self._bin.sync()
        self._bin.close()
        for f in (self._lengths, self._docs):
            f.close()
        itemsize = np.dtype(self.dtype).itemsize
        with self._open(self._idx_tmp) as idx:
            idx.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequences) + struct.pack("<Q", self.documents + 1))
            with open(self._lengths_tmp, "rb") as f:
                shutil.copyfileobj(f, idx, 16 << 20)
            offset = np.int64(0)
            with open(self._lengths_tmp, "rb") as f:
                while True:
                    lengths = np.frombuffer(f.read(4 * _CHUNK), dtype=np.int32)
                    if lengths.size == 0:
                        break
                    ends = np.cumsum(lengths, dtype=np.int64) * itemsize + offset
                    idx.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).tobytes())
                    offset = ends[-1]
            idx.write(np.zeros(1, np.int64).tobytes())
            with open(self._docs_tmp, "rb") as f:
                shutil.copyfileobj(f, idx, 16 << 20)
            idx.sync()
        bin_path, idx_path = self.prefix + ".bin", self.prefix + ".idx"
        # The order that keeps the halves matched: a reader sees the old pair,
        # a lone .bin (incomplete: rejected), or the new pair.
        remove_quietly(idx_path)
        os.replace(self._bin_tmp, bin_path)
        self._placed_bin = True
        os.replace(self._idx_tmp, idx_path)
        self._placed_bin = False
        fsync_dir(os.path.dirname(os.path.abspath(bin_path)))
        remove_quietly(self._lengths_tmp, self._docs_tmp)
        return bin_path, idx_path

    def abort(self) -> None:
        """Remove every file this writer made; never raises (a full disk makes
        closing fail too, and the clean-up must still happen)."""
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        remove_quietly(self._bin_tmp, self._idx_tmp, self._lengths_tmp, self._docs_tmp)
        if self._placed_bin:
            remove_quietly(self.prefix + ".bin")


class _OutputFile:
    """A binary output file whose failures name it: Python's file objects
    raise a bare "[Errno 28] No space left on device" for a full disk."""

    def __init__(self, path: str):
        self.name = path
        self._f = open(path, "wb")

    def _named(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, self.name) from e

    def write(self, data) -> int:
        return self._named(self._f.write, data)

    def sync(self) -> None:
        """Flush and fsync."""
        self._named(self._f.flush)
        self._named(os.fsync, self._f.fileno())

    def close(self) -> None:
        self._named(self._f.close)

    def __enter__(self) -> "_OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexHeader:
    """The fixed-size start of an `.idx` file and where its arrays begin."""

    def __init__(self, path: str, dtype: type, sequences: int, documents: int):
        self.path = path
        self.dtype = dtype
        self.sequences = sequences
        self.documents = documents  # real documents (the stored count minus the leading 0)
        self.lengths_offset = len(INDEX_HEADER) + 8 + 1 + 16
        self.pointers_offset = self.lengths_offset + 4 * sequences
        self.doc_indices_offset = self.pointers_offset + 8 * sequences


def read_index_header(prefix: str) -> IndexHeader:
    """The header of `{prefix}.idx`, after checking that the pair is complete
    and belongs together: the `.idx` has exactly the size its header implies,
    its document index ends at its sequence count, and the `.bin` holds
    exactly the bytes its last sequence ends at."""
    path, bin_path = prefix + ".idx", prefix + ".bin"
    if not os.path.exists(bin_path):
        raise DatasetFormatError(f"{path} has no partner {bin_path}: copy it next to the .idx or remove the .idx")
    if not os.path.exists(path):
        raise DatasetFormatError(f"{bin_path} has no partner {path} (an interrupted write leaves this): rerun the "
                                 "tool that wrote it, or copy the .idx next to the .bin")
    with open(path, "rb") as f:
        head = f.read(len(INDEX_HEADER) + 8 + 1 + 16)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise DatasetFormatError(f"{path} is not a Megatron indexed-dataset index (bad header)")
    code = head[17]
    if code not in CODE_DTYPES:
        raise DatasetFormatError(f"{path} has unknown dtype code {code}")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    header = IndexHeader(path, CODE_DTYPES[code], sequences, documents - 1)
    _check_pair(header, bin_path)
    return header


def checked_indexed_dataset(prefix: str):
    """megatron-core's `IndexedDataset` for `prefix`, after `read_index_header`'s checks."""
    read_index_header(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _check_pair(header: IndexHeader, bin_path: str) -> None:
    path = header.path
    rebuild = ("rebuild the pair with the tool that wrote it (e.g. tools/preprocess_data.py), or copy both "
               "files from one run")
    expected_idx = header.doc_indices_offset + 8 * (header.documents + 1)
    actual_idx = os.path.getsize(path)
    if header.documents < 0 or actual_idx != expected_idx:
        raise DatasetFormatError(f"{path} is {actual_idx:,} bytes but its header describes {expected_idx:,} "
                                 f"(truncated or corrupt): {rebuild}")
    expected_bin = 0
    with open(path, "rb") as f:
        f.seek(header.doc_indices_offset)
        first_doc, = struct.unpack("<q", f.read(8))
        f.seek(header.doc_indices_offset + 8 * header.documents)
        last_doc, = struct.unpack("<q", f.read(8))
        if header.sequences:
            f.seek(header.lengths_offset + 4 * (header.sequences - 1))
            last_length, = struct.unpack("<i", f.read(4))
            f.seek(header.pointers_offset + 8 * (header.sequences - 1))
            last_pointer, = struct.unpack("<q", f.read(8))
            expected_bin = last_pointer + last_length * np.dtype(header.dtype).itemsize
    if first_doc != 0 or last_doc != header.sequences:
        raise DatasetFormatError(f"{path} has a document index that does not cover its {header.sequences:,} "
                                 f"sequences (corrupt): {rebuild}")
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise DatasetFormatError(
            f"{bin_path} holds {actual_bin:,} bytes but {path} describes {expected_bin:,}: the two files are not "
            f"one dataset (truncated, or written by different runs): {rebuild}")


def _copy_bytes(src, dst, n: int) -> None:
    while n:
        chunk = src.read(min(n, 16 << 20))
        if not chunk:
            raise DatasetFormatError(f"{src.name} is truncated")
        dst.write(chunk)
        n -= len(chunk)
