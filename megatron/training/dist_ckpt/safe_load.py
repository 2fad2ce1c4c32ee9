"""Reading a torch_dist checkpoint never unpickles code.

What megatron-core 0.16.1 and torch.distributed.checkpoint read each file
with, and what this module reads it with instead:

| file                         | pip packages                               | here                                   |
|------------------------------|--------------------------------------------|----------------------------------------|
| metadata.json                | json                                       | json (unchanged)                       |
| common.pt                    | torch.load with weights_only left unset:   | torch.load(weights_only=True), with    |
|                              | TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the  | megatron-core's own list of safe       |
|                              | environment makes it unpickle anything     | classes (argparse.Namespace, enums...) |
| .metadata                    | pickle.load: anything                      | an unpickler that builds only the      |
|                              |                                            | index classes of torch.distributed.    |
|                              |                                            | checkpoint (`_INDEX_CLASSES`)          |
| __R_T.distcp, tensor entries | torch.load(weights_only=True)              | unchanged                              |
| __R_T.distcp, byte entries   | torch.load(weights_only=False): anything   | torch.load(weights_only=True)          |
|   (ShardedObjects: RNG state,|                                            |                                        |
|    layers' extra state)      |                                            |                                        |

`SafeShardedLoadStrategy` and `SafeCommonLoadStrategy` are the load
strategies handed to `dist_checkpointing.load`; the first reroutes
megatron-core's file-reader factory to `SafeReader` for the duration of each
of its calls.
"""

import contextlib
import functools
import os
import pickle
import threading
from typing import Optional

import torch
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.safe_globals import SAFE_GLOBALS
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron.training.checkpoint_integrity import first_line
from megatron.training.checkpointing import CheckpointError

METADATA_FILE = ".metadata"

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
    path = os.path.join(iter_dir, COMMON_STATE_FNAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint at {iter_dir} is incomplete")
    return torch_load_weights_only(path, path)


def _check_size(path: str, needed: int) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    size = os.path.getsize(path)
    if size < needed:
        raise CheckpointError(f"{path} is truncated ({size} bytes; its index needs {needed}): the file is cut short")


def incomplete_reason(iter_dir: str) -> Optional[str]:
    """Why a torch_dist iteration directory cannot be loaded (a file missing,
    unreadable or shorter than its index says), or None."""
    try:
        load_common(iter_dir)
        for info in read_index(os.path.join(iter_dir, METADATA_FILE)).storage_data.values():
            _check_size(os.path.join(iter_dir, info.relative_path), info.offset + info.length)
    except (CheckpointError, OSError) as e:
        return first_line(e)
    return None


def _load_bytes_weights_only(planner, checkpoint_dir: str, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes, with weights_only=True."""
    obj = torch_load_weights_only(value, f"{checkpoint_dir} (entry {read_item.dest_index.fqn})")
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeReader(CachedMetadataFileSystemReader):
    """torch.distributed.checkpoint's file reader with a restricted index
    unpickler and weights-only byte entries."""

    def read_metadata(self, *args, **kwargs):
        if self._cached_metadata is None:
            path = str(self._get_metadata_path(kwargs.get("rank")))
            metadata = read_index(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata

    def read_data(self, plan, planner):
        needed = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in needed.items():  # a missing or cut file named, rather than a failed unpickling
            _check_size(os.path.join(str(self.path), name), size)
        planner.load_bytes = functools.partial(_load_bytes_weights_only, planner, str(self.path))
        return super().read_data(plan, planner)


_reroute_lock = threading.RLock()  # re-entered: load_sharded_metadata calls load_tensors_metadata


@contextlib.contextmanager
def _safe_readers():
    """megatron-core's torch strategy makes its file readers through one
    module-level factory; while this is active it makes SafeReaders."""
    with _reroute_lock:
        original = mcore_torch_strategy._get_filesystem_reader
        mcore_torch_strategy._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: \
            SafeReader(checkpoint_dir)
        try:
            yield
        finally:
            mcore_torch_strategy._get_filesystem_reader = original


class SafeShardedLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy, reading through SafeReader."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _safe_readers():
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with _safe_readers():
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _safe_readers():
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron-core's common-state strategy, reading common.pt weights-only."""

    def load_common(self, checkpoint_dir):
        return load_common(str(checkpoint_dir))

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # Only used when the sharded strategy cannot read objects itself; ours can.
        raise CheckpointError(f"{checkpoint_dir} stores objects as separate .pt files, which this loader does not "
                              "read: it is not a torch_dist checkpoint")
