"""Reading a torch_dist checkpoint never unpickles code: megatron-core's load
strategies, reading each file with the readers of checkpoint/files.py (the
table there says what each file is read with, and what the pip packages
read it with).

`SafeShardedLoadStrategy` and `SafeCommonLoadStrategy` are the load
strategies handed to `dist_checkpointing.load`; the first reroutes
megatron-core's file-reader factory to `SafeReader` for the duration of each
of its calls: the index (.metadata) through files.read_index, byte entries of
`__R_T.distcp` (ShardedObjects: RNG state, layers' extra state) with
torch.load(weights_only=True) instead of megatron-core's weights_only=False,
and a missing or cut file named before anything is read from it.
"""

import contextlib
import functools
import os
import pickle
import threading

from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron.training.checkpoint.files import (
    check_size, load_common, read_index, torch_load_weights_only, unpickling_reason,
)
from megatron.training.errors import CheckpointError


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
            check_size(os.path.join(str(self.path), name), size)
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


def reading_error(error: DcpCheckpointException, iter_dir: str) -> CheckpointError:
    """One line for what torch.distributed.checkpoint gathered from the
    ranks' readers (its message carries their tracebacks)."""
    cause = next(iter(error.failures.values()))[0]
    if isinstance(cause, CheckpointError):
        return CheckpointError(str(cause))
    if isinstance(cause, pickle.UnpicklingError):
        return CheckpointError(f"{iter_dir}: a tensor entry holds an object that loading with weights_only=True "
                               f"refuses ({unpickling_reason(cause)}): refusing to load it")
    return CheckpointError(f"{iter_dir}: {str(cause).strip().splitlines()[0] if str(cause).strip() else cause!r}")
