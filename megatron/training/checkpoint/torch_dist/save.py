"""Saving torch_dist checkpoints: staged, synced, published last; synchronous
or asynchronous (--async-save).

Each save writes into a staging directory of its own,
`iter_XXXXXXX.partial.<8 hex digits>`: megatron-core's writer processes put
each rank's shards there (`__R_T.distcp`, each fsynced by the process that
wrote it, through writing.py's hook: hashed as written with --ckpt-checksum)
and rank 0 writes common.pt. Once the writers are done on every rank,
megatron-core's finalization gathers their results and writes the index
(`.metadata`, fsynced) and metadata.json; then rank 0 writes
checksums.sha256 (--ckpt-checksum: checksums.py), fsyncs those, renames the
directory to `iter_XXXXXXX` and only then moves the tracker. A save
killed at any moment leaves the tracker on the previous complete checkpoint;
the next save removes what killed attempts left (with the torch format's
leftovers: iterations.sweep_save_dir). Every attempt has its own
directory, so a writer process that outlived a killed job can never write
into a later attempt's files. A write that fails on any rank (a full disk)
stops every rank with the same one-line error; the attempt's directory is
removed and the previous checkpoint stays the latest.

--async-save: the writing happens in a forked process (the parent's memory at
the fork is what gets written; on GPUs megatron-core first copies the tensors
to host memory), so the loop is blocked only while the state is gathered and
staged. The loop calls `finalize_async_saves` every iteration: a save is
published once its writers are done on every rank; at the end of training
the loop waits for it. One asynchronous save is in flight at a time (a save
that comes while the previous one is still writing waits for it).
"""

import functools
import glob
import multiprocessing
import os
import re
import shutil
from multiprocessing.managers import SyncManager
from typing import Callable, List, Optional, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from megatron.training.checkpoint.iterations import (
    PARTIAL_SUFFIX, agreed_error, iteration_dir, publish_iteration, save_failed, sweep_save_dir,
)
from megatron.training.checkpoint.torch_dist import checksums, serve_writer_results
from megatron.training.checkpoint.torch_dist import state as state_module
from megatron.training.checkpoint.torch_dist.writing import SaveStrategy
from megatron.training.errors import UserError, first_line
from megatron.training.fileio import describe_os_error, fsync_path

# A writer's OSError as it reaches the coordinator: "Worker failure: [Errno 28] No space left on device: 'path'"
# (an fsync's has no path).
_OS_ERROR_TEXT = re.compile(r"\[Errno (\d+)\] ([^:']+)(?:: '([^']+)')?")
# Files rank 0 writes without fsyncing them (megatron-core's torch.save / json.dump).
_UNSYNCED_FILES = ("common.pt", "metadata.json")


class _AsyncSaves:
    """megatron-core's queue of asynchronous saves, and their (root, iteration,
    staging directory), oldest first."""

    def __init__(self):
        self.queue = None
        self.pending: List[Tuple[str, int, str]] = []

    def staging_dirs(self) -> List[str]:
        return [staging for _, _, staging in self.pending]

    def schedule(self, args, request, root: str, iteration: int, staging: str) -> None:
        if self.queue is None:
            self.queue = AsyncCallsQueue(persistent=args.use_persistent_ckpt_worker)
        self.queue.schedule_async_request(request)
        self.pending.append((root, iteration, staging))

    def finalize(self, blocking: bool) -> None:
        if not self.pending:
            return
        try:
            finished = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as e:
            root, iteration, _ = self.pending[0]
            for _, _, staging in self.pending:
                _remove_staging(staging)
            self.pending.clear()
            raise _save_error(e, root, iteration) from None
        del self.pending[:len(finished)]
        if blocking:
            self.queue.close()
            self.queue = None


_ASYNC = _AsyncSaves()


def start_writer_queue() -> None:
    """Start the process that serves megatron-core's writer-result queue now
    (megatron-core starts it in the first save otherwise, inside the time that
    save blocks training), as megatron-core does but with an initializer that
    keeps it alive through the termination signal a preemption save runs
    after (torch_dist.serve_writer_results). It is a spawned process, which
    re-imports the entry point: hence every entry point's `if __name__ ==
    "__main__":` guard."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(serve_writer_results)
        filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive


def finalize_async_saves(blocking: bool = False) -> None:
    """Publish the asynchronous saves whose writers are done on every rank;
    with `blocking`, wait for all of them. Collective while saves are pending."""
    _ASYNC.finalize(blocking)


def save_checkpoint(args, iteration: int, model: list, optimizer, scheduler, consumed_train_samples: int) -> str:
    """Save (or, with --async-save, start saving) the checkpoint of `iteration`
    under args.save. Collective. Returns the iteration directory it is
    published as."""
    return save_sharded_state(
        args, iteration,
        lambda: state_module.state_for_save(args, model, optimizer, scheduler, iteration, consumed_train_samples),
        state_module.content_metadata(args))


def save_sharded_state(args, iteration: int, make_state: Callable[[], dict], content_metadata: dict) -> str:
    """save_checkpoint for the sharded state dict `make_state()` returns (a
    benchmark's, or the training state): staged, written (with --async-save
    in the background), published. Reads args.save, args.async_save,
    args.ckpt_checksum, args.ckpt_fully_parallel_save, args.use_persistent_ckpt_worker."""
    root = args.save
    final_dir = iteration_dir(root, iteration)
    if _ASYNC.pending:
        # One asynchronous save at a time: megatron-core's forked writers report
        # through one queue per process, which does not say which save a result is for.
        if torch.distributed.get_rank() == 0:
            print(f"waiting for the asynchronous save of iteration {_ASYNC.pending[0][1]} to finish before saving "
                  f"iteration {iteration} (a --save-interval longer than a save's writing avoids the wait)",
                  flush=True)
        _ASYNC.finalize(blocking=True)
    staging = _make_staging_dir(root, final_dir)
    try:
        request = dist_checkpointing.save(make_state(), staging, _save_strategy(args), async_sharded_save=True,
                                          content_metadata=content_metadata)
        # common.pt is written (by rank 0's torch.save) once save() returns; hashed while it is fresh.
        common = checksums.common_digest(staging) if args.ckpt_checksum and torch.distributed.get_rank() == 0 \
            else None
        request.add_finalize_fn(functools.partial(_publish, root, staging, final_dir, iteration, args.async_save,
                                                  common))
        if args.async_save:
            _ASYNC.schedule(args, request, root, iteration, staging)
        else:
            request.execute_sync()
    except BaseException as e:
        _remove_staging(staging)
        raise _save_error(e, root, iteration) from None
    return final_dir


def _save_error(error: BaseException, root: str, iteration: int) -> BaseException:
    """A failed write as iterations.save_failed's one line, the same on
    every rank; anything else (a bug, an interrupt) as it is.

    megatron-core raises torch's CheckpointException on every rank when a
    writer failed anywhere, with the writer's error on the coordinator only."""
    if not isinstance(error, (DcpCheckpointException, OSError)):
        return error
    detail = None
    if isinstance(error, OSError):
        detail = describe_os_error(error, "--save")
    elif error.failures:
        failure = next(iter(error.failures.values()))[0]
        found = _OS_ERROR_TEXT.search(str(failure))
        detail = (describe_os_error(OSError(int(found.group(1)), found.group(2).strip(), found.group(3)), "--save")
                  if found else first_line(failure))
    if isinstance(error, DcpCheckpointException):
        detail = agreed_error(detail) or "a checkpoint writer failed"
    return save_failed(root, iteration, detail)


def _save_strategy(args):
    strategy = SaveStrategy(checksum=args.ckpt_checksum)
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
        # What killed saves left: the torch format's leftovers, temporary files of dead
        # processes, and the staging directories of attempts that are not pending here.
        sweep_save_dir(root, lambda message: print(message, flush=True))
        for stale in glob.glob(os.path.join(glob.escape(root), "iter_*" + PARTIAL_SUFFIX + ".*")):
            if stale not in _ASYNC.staging_dirs():
                shutil.rmtree(stale, ignore_errors=True)
        name[0] = f"{final_dir}{PARTIAL_SUFFIX}.{os.urandom(4).hex()}"
        os.makedirs(name[0])
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def _remove_staging(staging: str) -> None:
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(root: str, staging: str, final_dir: str, iteration: int, was_async: bool,
             common: Optional[str]) -> None:
    """The last finalization step, on every rank once megatron-core has
    written the index: rank 0 writes checksums.sha256 (when `common`, the
    SHA-256 of common.pt, is given: --ckpt-checksum), syncs the files it
    wrote unsynced, renames the staging directory and moves the tracker. A
    failure there stops every rank with the same error."""
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            if common is not None:
                checksums.write_manifest(staging, common)
            for name in _UNSYNCED_FILES:
                fsync_path(os.path.join(staging, name))
            publish_iteration(root, staging, final_dir, iteration)
        except OSError as e:
            error = describe_os_error(e, "--save")
        except UserError as e:
            error = str(e)
        if was_async and error is None:
            print(f"finished the asynchronous save of {final_dir}", flush=True)
    error = agreed_error(error)  # collective, as the barrier it replaces
    if error is not None:
        raise save_failed(root, iteration, error)
