"""What megatron-core's writer processes write a torch_dist save through.

megatron-core writes each rank's `__R_T.distcp` files in worker processes,
one forked process per file (filesystem_async.FileSystemWriterAsync:
`write_preloaded_data`), for synchronous and asynchronous saves alike: the
file's write items one after another, each through
torch.distributed.checkpoint's stream-transform hook
(`_StorageWriterTransforms.transform_save_stream`), which megatron-core hands
to its workers. `FileStreams` is that hook; it changes no byte and adds
nothing to the index (no transform descriptors), and:

- with --ckpt-checksum, it feeds every byte of a file to the file's SHA-256
  as it goes to the file; when the file's last item is written, the digest
  is left beside it as `__R_T.distcp.sha256`. Rank 0 gathers these into the
  iteration's checksums.sha256 when it publishes the save (checksums.py),
  after every rank's writers are done: an asynchronous save is published
  with its checksums or not at all.
- a write that fails (a full disk) is kept and raised as the OSError it is,
  naming the file, when the item is closed. torch.save, which writes the
  tensor items, would turn it into "RuntimeError: [enforce fail at
  inline_container.cc:672] . unexpected pos ...", which does not say why;
  so until then the item's remaining writes are skipped, not failed.

`SaveStrategy` is megatron-core's torch_dist save strategy with this hook in
place (set on its writer before the save function is handed out).
"""

import hashlib
import io
from typing import Dict, List, Optional

from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.filesystem import _StorageWriterTransforms

DIGEST_SUFFIX = ".sha256"  # __R_T.distcp.sha256: a file's digest until the save is published


class _FileState:
    """One data file as its worker writes it: its hash, its items, its first failed write."""

    def __init__(self, path: str, items: int, checksum: bool):
        self.path, self.items_left = path, items
        self.sha256 = hashlib.sha256() if checksum else None
        self.error: Optional[OSError] = None


class _ItemWriter(io.IOBase):
    """The stream one write item is written to: on to the file, into its hash."""

    def __init__(self, stream, state: _FileState):
        super().__init__()
        self._stream, self._state = stream, state

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        state = self._state
        if state.error is None:
            try:
                self._stream.write(data)
            except OSError as e:
                state.error = e
            else:
                if state.sha256 is not None:
                    state.sha256.update(data)
        return size  # a failed write is raised at close(), where torch.save cannot rename it

    def close(self) -> None:
        if self.closed:
            return
        state = self._state
        if state.error is None:
            try:
                self._stream.close()  # torch's wrapper: flushes the file, leaves it open for the next item
            except OSError as e:
                state.error = e
        super().close()
        if state.error is not None:
            e = state.error
            raise OSError(e.errno, e.strerror, e.filename or state.path) from None
        state.items_left -= 1
        if state.items_left == 0 and state.sha256 is not None:
            with open(state.path + DIGEST_SUFFIX, "w", encoding="ascii") as f:
                f.write(state.sha256.hexdigest())


class FileStreams(_StorageWriterTransforms):
    """torch.distributed.checkpoint's stream-transform hook for one save:
    `buckets` is the writer's plan (megatron-core's write buckets: file path,
    file name, (byte items, tensor items)), which says which file each item
    goes to and which item is a file's last."""

    def __init__(self, buckets: List[tuple], checksum: bool):
        super().__init__(extensions=())
        self.checksum = checksum
        self.file_of: Dict[object, str] = {}
        self.items: Dict[str, int] = {}
        for path, _, (bytes_data, tensor_data) in buckets:
            for item, _ in list(bytes_data) + list(tensor_data):
                self.file_of[item.index] = path
            self.items[path] = len(bytes_data) + len(tensor_data)
        self._files: Dict[str, _FileState] = {}  # filled in the worker process that writes each file

    def __getstate__(self):  # what a persistent writer process receives: the plan, no files yet
        return dict(self.__dict__, _files={})

    def transform_save_stream(self, write_item, raw_stream):
        stream, descriptors = super().transform_save_stream(write_item, raw_stream)
        path = self.file_of[write_item.index]
        state = self._files.get(path)
        if state is None:
            state = self._files[path] = _FileState(path, self.items[path], self.checksum)
        return _ItemWriter(stream, state), descriptors


class SaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy, its writers writing through
    FileStreams (with the SHA-256 of each file when `checksum`)."""

    def __init__(self, checksum: bool):
        super().__init__("torch_dist", 1)
        self.checksum = checksum

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        # The writer has planned its files (prepare_write_data); its save function is made next.
        writer.transforms = FileStreams(writer.write_buckets or [], self.checksum)
        return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
