"""Saving torch_dist checkpoints: staged, synced, published last; synchronous
or asynchronous (--async-save).

Each save writes into a staging directory of its own,
`iter_XXXXXXX.partial.<8 hex digits>`: megatron-core's writer processes put
each rank's shards there (`__R_T.distcp`, each fsynced by the process that
wrote it) and rank 0 writes common.pt. Once the writers are done on every
rank, megatron-core's finalization gathers their results and writes the index
(`.metadata`, fsynced) and metadata.json; then rank 0 fsyncs those, renames
the directory to `iter_XXXXXXX` and only then moves the tracker. A save
killed at any moment leaves the tracker on the previous complete checkpoint.
The next save of that iteration removes what a killed attempt left; because
every attempt has its own directory, a writer process that outlived a killed
job can never write into a later attempt's files.

--async-save: the writing happens in a forked process (the parent's memory at
the fork is what gets written; on GPUs megatron-core first copies the tensors
to host memory), so the loop is blocked only while the state is gathered and
staged. The loop calls `finalize_async_saves` every iteration: a save is
published once its writers are done on every rank; at the end of training
the loop waits for all of them.
"""

import functools
import glob
import os
import shutil
from typing import List

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from megatron.training import checkpointing
from megatron.training.dist_ckpt import state as state_module
from megatron.training.fileio import fsync_path

# Files rank 0 writes without fsyncing them (megatron-core's torch.save / json.dump).
_UNSYNCED_FILES = ("common.pt", "metadata.json")


class _AsyncSaves:
    """megatron-core's queue of asynchronous saves, and their staging directories."""

    def __init__(self):
        self.queue = None
        self.pending: List[str] = []  # staging directories, oldest first

    def schedule(self, args, request, staging: str) -> None:
        if self.queue is None:
            self.queue = AsyncCallsQueue(persistent=args.use_persistent_ckpt_worker)
        self.queue.schedule_async_request(request)
        self.pending.append(staging)

    def finalize(self, blocking: bool) -> None:
        if not self.pending:
            return
        try:
            finished = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException:
            for staging in self.pending:
                _remove_staging(staging)
            self.pending.clear()
            raise
        del self.pending[:len(finished)]
        if blocking:
            self.queue.close()
            self.queue = None


_ASYNC = _AsyncSaves()


def start_writer_queue() -> None:
    """Start the process that serves megatron-core's writer-result queue now
    (it is started by the first save otherwise, inside the time that save
    blocks training). It is a spawned process, which re-imports the entry
    point: hence every entry point's `if __name__ == "__main__":` guard."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

    _get_write_results_queue()


def finalize_async_saves(blocking: bool = False) -> None:
    """Publish the asynchronous saves whose writers are done on every rank;
    with `blocking`, wait for all of them. Collective while saves are pending."""
    _ASYNC.finalize(blocking)


def save_checkpoint(args, iteration: int, model: list, optimizer, scheduler, consumed_train_samples: int) -> str:
    """Save (or, with --async-save, start saving) the checkpoint of `iteration`
    under args.save. Collective. Returns the iteration directory it is
    published as."""
    root = args.save
    final_dir = checkpointing.iteration_dir(root, iteration)
    staging = _make_staging_dir(root, final_dir)
    try:
        state = state_module.state_for_save(args, model, optimizer, scheduler, iteration, consumed_train_samples)
        request = dist_checkpointing.save(state, staging, _save_strategy(args), async_sharded_save=True,
                                          content_metadata=state_module.content_metadata(args))
        request.add_finalize_fn(functools.partial(_publish, root, staging, final_dir, iteration, args.async_save))
        if args.async_save:
            _ASYNC.schedule(args, request, staging)
        else:
            request.execute_sync()
    except BaseException:
        _remove_staging(staging)
        raise
    return final_dir


def _save_strategy(args):
    strategy = get_default_save_sharded_strategy("torch_dist")
    if args.ckpt_fully_parallel_save:
        # Data-parallel replicas share the writing of the tensors they all hold.
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
    return strategy


def _make_staging_dir(root: str, final_dir: str) -> str:
    """A new, empty staging directory for `final_dir` (made by rank 0, its
    name shared with every rank); earlier attempts' leftovers are removed."""
    name = [None]
    if torch.distributed.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(glob.escape(final_dir + checkpointing.PARTIAL_SUFFIX) + "*"):
            if stale not in _ASYNC.pending:
                shutil.rmtree(stale, ignore_errors=True)
        name[0] = f"{final_dir}{checkpointing.PARTIAL_SUFFIX}.{os.urandom(4).hex()}"
        os.makedirs(name[0])
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def _remove_staging(staging: str) -> None:
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(root: str, staging: str, final_dir: str, iteration: int, was_async: bool) -> None:
    """The last finalization step, on every rank once megatron-core has
    written the index: rank 0 syncs the files it wrote unsynced, renames the
    staging directory and moves the tracker."""
    if torch.distributed.get_rank() == 0:
        for name in _UNSYNCED_FILES:
            fsync_path(os.path.join(staging, name))
        checkpointing.publish_iteration(root, staging, final_dir, iteration)
        if was_async:
            print(f"finished the asynchronous save of {final_dir}", flush=True)
    torch.distributed.barrier()
