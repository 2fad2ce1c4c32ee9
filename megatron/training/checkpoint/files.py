"""One checkpoint file at a time: written aside and renamed, hashed while it is
written, and read back without ever unpickling code. Knows no directory
layout (iterations.py) and no format (torch_format.py, torch_dist/).

Writing
- `atomic_torch_save(obj, path, checksum)`: torch.save to `PATH.tmp-PID`,
  fsync, rename; the SHA-256 computed while writing (no second read).
- `write_checksums(dir, {name: digest})`: `checksums.sha256` in `sha256sum -c`
  format (--ckpt-checksum); `checksum_problem(path)` compares a file with it.

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
import os
import pickle
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


def checksum_problem(path: str) -> Optional[str]:
    """Why `path` does not match the checksum recorded beside it, or None
    (it matches, or no checksum was recorded)."""
    expected = read_checksums(os.path.dirname(path)).get(os.path.basename(path))
    if expected is None:
        return None
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
    with the index classes only."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            return _IndexUnpickler(f, path).load()
    except (EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): the file is truncated or "
                              "corrupt") from None


def unpickling_reason(error: Exception) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named or lines or [type(error).__name__])[0].replace("WeightsUnpickler error: ", "").split(". ")[0]


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


def load_common(iter_dir: str) -> dict:
    """The common (non-sharded) state of a torch_dist iteration directory:
    args, iteration, LR scheduler, content metadata."""
    path = os.path.join(iter_dir, COMMON_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint at {iter_dir} is incomplete")
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
        raise CheckpointError(f"{path} is truncated ({size} bytes; its index needs {needed}): the file is cut short")
