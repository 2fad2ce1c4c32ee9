"""Merge indexed datasets (every `.bin`/`.idx` pair in a folder) into one,
streaming: the token data is copied file to file and the index is rebuilt in
fixed-size chunks, so thousands of shards need no more memory than two."""

import os
from typing import List

from megatron.training.data.indexed_writer import DatasetFormatError, IndexedDatasetWriter, read_index_header


def find_dataset_prefixes(folder: str) -> List[str]:
    """Sorted prefixes of the `.bin`/`.idx` pairs in `folder`; a file without
    its partner is an error naming it."""
    if not os.path.isdir(folder):
        raise DatasetFormatError(f"--input {folder} is not a folder: give the folder holding the .bin/.idx pairs")
    names = os.listdir(folder)
    stems = {n[:-4] for n in names if n.endswith((".bin", ".idx"))}
    prefixes = []
    for stem in sorted(stems):
        for ext, other in ((".bin", ".idx"), (".idx", ".bin")):
            if stem + ext in names and stem + other not in names:
                raise DatasetFormatError(
                    f"{os.path.join(folder, stem + ext)} has no partner {stem + other}: "
                    "copy it into the folder or move the lone file out")
        prefixes.append(os.path.join(folder, stem))
    if not prefixes:
        raise DatasetFormatError(f"--input {folder} holds no .bin/.idx pairs")
    return prefixes


def merge_datasets(folder: str, output_prefix: str) -> IndexedDatasetWriter:
    """Concatenate the datasets of `folder` in name order into
    `{output_prefix}.bin/.idx` (the same bytes as Megatron-LM's merge tool).
    Every input is checked (complete, .bin matching its .idx) before the
    output is opened."""
    prefixes = find_dataset_prefixes(folder)
    headers = [read_index_header(p) for p in prefixes]  # every input checked before anything is written
    if not any(h.documents for h in headers):
        raise DatasetFormatError(f"--input {folder}: its {len(headers)} dataset(s) hold no document: "
                                 "nothing to merge")
    dtypes = {h.dtype for h in headers}
    if len(dtypes) > 1:
        first = headers[0]
        odd = next(h for h in headers if h.dtype != first.dtype)
        raise DatasetFormatError(
            f"{odd.path} stores {odd.dtype.__name__} but {first.path} stores {first.dtype.__name__}: "
            "merge only datasets made with vocabularies of the same size class")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise DatasetFormatError(f"--output-prefix {output_prefix} is one of the inputs: write it elsewhere")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    writer = IndexedDatasetWriter(output_prefix, headers[0].dtype)
    try:
        for p in prefixes:
            writer.add_dataset(p)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return writer
