"""One checkpoint file at a time: written aside and renamed, hashed while it is
written, and read back without ever unpickling code. Knows no directory
layout (iterations.py) and no format (torch_format.py, torch_dist/).

Writing
- `atomic_torch_save(obj, path, checksum)`: torch.save to `PATH.tmp-PID`,
  fsync, rename; the SHA-256 computed while writing (no second read).
- `write_checksums(dir, {name: digest})`: `checksums.sha256` in `sha256sum -c`
  format (--ckpt-checksum); `checksum_problem(path)` compares a file with it.
  The torch format keeps one per rank directory; torch_dist one per
  iteration directory, for every file of it (torch_dist/checksums.py).

Checks that need no checksum (a damaged file named as such, never loaded):
- common.pt (a zip, like every torch.save file): the CRC-32 of each member,
  which torch.load does not check, is checked before it is unpickled.
- .metadata: besides refusing every class an index is not made of,
  `index_problem` checks that the index is consistent with itself (every
  entry points into a data file, the entries of each file lie end to end,
  every tensor's chunks cover it), which a flipped byte almost always breaks.

Reading (what each file is read with instead of what the pip packages use):
| file                       | megatron-core / torch.distributed.checkpoint | here                                   |
|----------------------------|----------------------------------------------|----------------------------------------|
| model_optim_rng.pt, ...    | -                                            | torch.load(weights_only=True)          |
| common.pt (torch_dist)     | torch.load with weights_only left unset:     | `torch_load_weights_only`: weights-only|
|                            | TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the    | with megatron-core's own list of safe  |
|                            | environment makes it unpickle anything       | classes (argparse.Namespace, enums...) |
| .metadata (torch_dist)     | pickle.load: anything                        | `read_index`: an unpickler that builds |
|                            |                                              | only torch.distributed.checkpoint's    |
|                            |                                              | index classes (`_INDEX_CLASSES`)       |
The torch_dist tensor files (`__R_T.distcp`) are read by megatron-core through
torch_dist/safe_load.py, which uses these readers.
"""

import hashlib
import math
import os
import pickle
import re
import zipfile
from collections import defaultdict
from typing import Dict, Optional

import torch

from megatron.training.errors import CheckpointError, first_line
from megatron.training.fileio import atomic_write_text, remove_quietly, temp_name

CHECKSUM_FILE = "checksums.sha256"
COMMON_FILE = "common.pt"  # megatron-core's COMMON_STATE_FNAME
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index
_READ_BYTES = 16 << 20


# ---------------------------------------------------------------- writing

class CheckpointFileWriter:
    """A binary file object for torch.save that hashes what is written through
    it (when `checksum`) and keeps the first OSError of a write: torch.save
    reports a full disk as "RuntimeError: ... unexpected pos", and the
    OSError is what says what happened."""

    def __init__(self, f, checksum: bool):
        self._f = f
        self.sha256 = hashlib.sha256() if checksum else None
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        if self.sha256 is not None:
            self.sha256.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_torch_save(obj, path: str, checksum: bool = False) -> Optional[str]:
    """torch.save to a temporary name, fsync, then rename onto `path`; the
    temporary is removed on any failure. Returns the file's SHA-256 (hex)
    when `checksum`, computed while writing."""
    tmp = temp_name(path)
    out = None
    try:
        with open(tmp, "wb") as f:
            out = CheckpointFileWriter(f, checksum)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        # torch.save reports a failed write as a RuntimeError, and a failed flush
        # has no file name: raise the OSError, naming the file.
        cause = out.error if out is not None and out.error is not None else e
        if isinstance(cause, OSError) and (cause is not e or not e.filename):
            raise OSError(cause.errno, cause.strerror, tmp) from e
        raise
    return out.sha256.hexdigest() if checksum else None


# ---------------------------------------------------------------- checksums

def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_BYTES)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def write_checksums(folder: str, digests: Dict[str, str]) -> None:
    """`checksums.sha256` for the files of one directory (name -> hex digest)."""
    atomic_write_text(os.path.join(folder, CHECKSUM_FILE),
                      "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())))


def read_checksums(folder: str) -> Dict[str, str]:
    """name -> hex digest from a directory's checksums.sha256 ({} when absent)."""
    path = os.path.join(folder, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            digest, _, name = line.strip().partition("  ")
            if name:
                out[name] = digest
    return out


def checksum_problem(path: str, expected: Optional[str] = None) -> Optional[str]:
    """Why `path` does not match its SHA-256, `expected` or else the one
    recorded beside it, or None (it matches, or no checksum was recorded)."""
    if expected is None:
        expected = read_checksums(os.path.dirname(path)).get(os.path.basename(path))
    if expected is None:
        return None
    if not os.path.isfile(path):
        return f"it is missing, though {CHECKSUM_FILE} lists it: the checkpoint is incomplete"
    actual = sha256_file(path)
    if actual != expected:
        return (f"its SHA-256 {actual[:16]}... differs from the {expected[:16]}... recorded in {CHECKSUM_FILE} "
                "when it was saved (the file changed on disk: a bad copy, disk or memory error)")
    return None


# ---------------------------------------------------------------- reading without unpickling code

# Everything the index file (.metadata) of a checkpoint written by megatron-core
# or torch.distributed.checkpoint is made of: plain data classes, torch.Size,
# dtypes and the layout lookup. Nothing here runs code when rebuilt.
_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    # Empty placeholder classes megatron-core keeps for older checkpoints' indexes.
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
}


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _IndexUnpickler(pickle.Unpickler):
    """Builds a torch.distributed.checkpoint index; refuses every other class."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if name in _INDEX_CLASSES.get(module, ()) or _is_dtype(module, name):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path} asks to build {module}.{name}, which a checkpoint index never holds: "
                              "refusing to load it (the file was altered or is not a checkpoint index)")


def read_index(path: str):
    """The torch.distributed.checkpoint `Metadata` in the file `path`, unpickled
    with the index classes only and checked for consistency (`index_problem`)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in any way (bad opcodes, text, arguments)
        raise CheckpointError(f"{path} is damaged: it cannot be unpickled ({type(e).__name__}: {first_line(e)}); "
                              "the file is truncated or corrupt") from None
    problem = index_problem(index)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem} (a byte of the file changed, or it was altered)")
    return index


# How megatron-core's writers name the data files of a torch_dist checkpoint: __<rank>_<writer>.distcp,
# optionally after a separation prefix; never a path.
_DATA_FILE = re.compile(r"^[A-Za-z0-9_.\-]*__\d+_\d+\.distcp$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chunk_problem(fqn: str, meta) -> Optional[str]:
    """What is wrong with one tensor entry of an index: its properties, shape and chunks."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    properties, size = getattr(meta, "properties", None), getattr(meta, "size", None)
    dtype, layout = getattr(properties, "dtype", None), getattr(properties, "layout", None)
    if not isinstance(dtype, torch.dtype) or layout is not torch.strided:
        return f"tensor {fqn} has the dtype {dtype!r} and layout {layout!r}"
    if not isinstance(size, torch.Size) or not all(_is_int(d) and d >= 0 for d in size):
        return f"tensor {fqn} has the shape {size!r}"
    covered = 0
    for chunk in getattr(meta, "chunks", None) or []:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        ok = isinstance(chunk, ChunkStorageMetadata) and all(
            isinstance(v, torch.Size) and len(v) == len(size) for v in (offsets, sizes))
        if not ok or not all(_is_int(o) and _is_int(n) and 0 <= o and 0 <= n and o + n <= d
                             for o, n, d in zip(offsets, sizes, size)):
            return f"tensor {fqn} of shape {list(size)} has a chunk at {offsets!r} of size {sizes!r}, outside it"
        covered += math.prod(sizes)
    if covered != math.prod(size):
        return f"the chunks of tensor {fqn} hold {covered} elements, its shape {list(size)} has {math.prod(size)}"
    return None


def _entry_name(key) -> str:
    """An index key as a reader knows it: the entry's name, and a tensor chunk's offsets."""
    fqn, offset = getattr(key, "fqn", None), getattr(key, "offset", None)
    if not isinstance(fqn, str):
        return repr(key)[:120]
    return fqn if offset is None else f"{fqn} (the chunk at {list(offset)})"


def index_problem(index) -> Optional[str]:
    """What is inconsistent in a torch.distributed.checkpoint index as
    megatron-core's writers make it, or None: each tensor's chunks lie in its
    shape and cover it; every chunk and byte entry has exactly one storage
    entry and every storage entry belongs to one; storage entries point into
    `__R_T.distcp` files, where each file's entries lie end to end from byte 0
    (its writer appends them one after another)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, \
        TensorStorageMetadata

    entries, storage = getattr(index, "state_dict_metadata", None), getattr(index, "storage_data", None)
    if not isinstance(index, Metadata):
        return f"it holds a {type(index).__name__}, not a checkpoint index (torch.distributed.checkpoint's Metadata)"
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "its Metadata lacks the entries (state_dict_metadata) or where their data is (storage_data)"
    expected = set()
    for fqn, meta in entries.items():
        if not isinstance(fqn, str):
            return f"it names an entry {fqn!r}"
        if isinstance(meta, TensorStorageMetadata):
            problem = _chunk_problem(fqn, meta)
            if problem:
                return problem
            expected.update(MetadataIndex(fqn, chunk.offsets) for chunk in meta.chunks)
        elif isinstance(meta, BytesStorageMetadata):
            expected.add(MetadataIndex(fqn))
        else:
            return f"entry {fqn} is {type(meta).__name__}, neither a tensor nor bytes"
    files = defaultdict(list)
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or key not in expected:
            return f"it stores data for {_entry_name(key)}, which none of its entries has"
        name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or not _DATA_FILE.match(name):
            return f"the data of {_entry_name(key)} is in {name!r}, not in a __R_T.distcp file beside it"
        if not (_is_int(offset) and _is_int(length) and offset >= 0 and length > 0):
            return f"the data of {_entry_name(key)} is at offset {offset!r}, length {length!r} of {name}"
        files[name].append((offset, length, _entry_name(key)))
    missing = expected - set(storage)
    if missing:
        return f"it stores no data for {min(_entry_name(k) for k in missing)}"
    for name, spans in files.items():
        end = 0
        for offset, length, fqn in sorted(spans):
            if offset != end:
                what = "overlaps the entry before it" if offset < end else f"leaves bytes {end}-{offset} unused"
                return f"the data of {fqn} in {name} (offset {offset}) {what}"
            end = offset + length
    return None


def unpickling_reason(error: Exception) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error" in line] or \
        [line for line in lines if "unsupported global" in line.lower()]  # "Trying to load unsupported GLOBAL ..."
    return (named or lines or [type(error).__name__])[0].replace("WeightsUnpickler error: ", "").split(". ")[0] \
        .rstrip(".")


def torch_load_weights_only(source, where: str):
    """torch.load(weights_only=True) with megatron-core's safe classes; an
    object outside them is a one-line CheckpointError naming `where`."""
    from megatron.core.safe_globals import SAFE_GLOBALS  # imported here: megatron.core takes seconds to import

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where} holds an object that loading with weights_only=True refuses "
                              f"({unpickling_reason(e)}): "
                              "refusing to load it (the file was altered, or written by code that pickled more "
                              "than tensors and plain data)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{where} cannot be loaded ({first_line(e)}): the file is truncated or corrupt") \
            from None


def zip_problem(path: str) -> Optional[str]:
    """What is damaged in a torch.save file (a zip archive), or None: the
    archive's structure and the CRC-32 of every member, which torch.load does
    not check. Reads the whole file: for small files (common.pt)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as e:
        return f"it is not a readable zip archive, as torch.save writes ({first_line(e)})"
    if bad is not None:
        return f"its member {bad} fails its CRC-32 check (its bytes changed after it was written)"
    return None


def load_common(iter_dir: str) -> dict:
    """The common (non-sharded) state of a torch_dist iteration directory:
    args, iteration, LR scheduler, content metadata; its zip CRCs checked first."""
    path = os.path.join(iter_dir, COMMON_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint at {iter_dir} is incomplete")
    problem = zip_problem(path)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    return torch_load_weights_only(path, path)


def common_args(common: dict, iter_dir: str) -> dict:
    """The flags a torch_dist iteration's common state records, as a dict."""
    saved = common.get("args")
    if saved is None:
        raise CheckpointError(f"{iter_dir}/common.pt has no 'args': it was not written by a training run "
                              "(this driver or Megatron-LM), so its model cannot be rebuilt")
    return dict(vars(saved)) if hasattr(saved, "__dict__") else dict(saved)  # Megatron-LM: a Namespace


def check_size(path: str, needed: int) -> None:
    """A file the index says holds `needed` bytes: missing or shorter is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    size = os.path.getsize(path)
    if size < needed:
        raise CheckpointError(f"{path} is truncated ({size} bytes; its index needs {needed}): the file is cut short "
                              f"(or the index, {METADATA_FILE}, is damaged)")
