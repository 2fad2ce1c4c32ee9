"""A torch_dist save killed at any moment (SIGKILL of the whole job: ranks and
their writer processes), synchronous or asynchronous, leaves the tracker on a
complete checkpoint; the next run resumes from it, and in the end the run
reproduces the uninterrupted one bit for bit (weights, Adam moments, LR
schedule, data position and dropout RNG all came back)."""

import glob
import multiprocessing
import os
import pickle
import random
import re
import signal
import time

import pytest

from tests.training.checkpoint.torch_dist.conftest import tiny_argv
from tests.training.pretrain_runner import run_pretrain

ITERS = 16
DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
LAYOUT = ["--use-distributed-optimizer"]  # two processes: DP=2
# Each round resumes from the last published checkpoint, waits until it has
# published one more of its own and started the next save, then kills the job
# after a random delay (seconds, uniform in the range): short delays land
# inside that save, longer ones anywhere in its writing, its finalization or
# the training that goes on meanwhile.
ROUNDS = [("sync", 0.0, 0.05), ("async", 0.0, 0.05), ("sync", 0.05, 0.6), ("async", 0.05, 1.0)]
# The asynchronous rounds gather the distributed optimizer's state the memory-efficient
# way (on one DP rank, over gloo); megatron-core reads either layout back.
MODE_FLAGS = {"sync": [], "async": ["--async-save", "--distrib-optim-fully-reshardable-mem-efficient"]}


def _job(argv, world_size, result_path):
    os.setsid()  # one process group: the kill takes the ranks and their writer processes with it
    history = run_pretrain(argv, world_size)
    with open(result_path, "wb") as f:
        pickle.dump(history, f)


def _tracker(root):
    path = os.path.join(root, "latest_checkpointed_iteration.txt")
    return int(open(path).read()) if os.path.exists(path) else 0


def _published(root):
    """The iteration the tracker names, after checking its directory is complete
    (every file the index points into exists and is long enough)."""
    from megatron.training.checkpoint.files import read_index

    iteration = _tracker(root)
    iter_dir = os.path.join(root, f"iter_{iteration:07d}")
    assert {"metadata.json", "common.pt", ".metadata"} <= set(os.listdir(iter_dir)), iter_dir
    for info in read_index(os.path.join(iter_dir, ".metadata")).storage_data.values():
        path = os.path.join(iter_dir, info.relative_path)
        assert os.path.getsize(path) >= info.offset + info.length, path
    return iteration


def _staging_dirs(root):
    return set(glob.glob(os.path.join(root, "iter_*.partial.*")))


def _next_save_started(root, published):
    """This run has published a checkpoint beyond `published` and started a later save."""
    now = _tracker(root)
    return now > published and any(int(os.path.basename(p)[5:12]) > now for p in _staging_dirs(root))


@pytest.mark.slow
def test_saves_killed_at_random_points_leave_a_loadable_checkpoint(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    root, result = str(tmp_path / "ckpt"), str(tmp_path / "result.pkl")
    argv = tiny_argv(DROPOUT + LAYOUT + ["--save", root, "--load", root, "--save-interval", "1"], iters=ITERS)
    ctx = multiprocessing.get_context("fork")
    published, killed_mid_save = 0, {"sync": 0, "async": 0}
    for mode, low, high in ROUNDS:
        left_before = _staging_dirs(root)
        job = ctx.Process(target=_job, args=(argv + MODE_FLAGS[mode], 2, result))
        job.start()
        deadline = time.time() + 300
        while not _next_save_started(root, published) and job.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        assert job.is_alive(), f"seed {seed}, {mode}: the run ended (exit code {job.exitcode}) before being killed"
        time.sleep(rng.uniform(low, high))
        os.killpg(job.pid, signal.SIGKILL)
        job.join()
        assert job.exitcode == -signal.SIGKILL, f"seed {seed}, {mode}: exit code {job.exitcode}"
        now = _published(root)
        assert now > published, f"seed {seed}: the tracker went from {published} to {now}"
        killed_mid_save[mode] += bool(_staging_dirs(root) - left_before)
        published = now
    assert all(killed_mid_save.values()), f"seed {seed}: no round of some mode was killed mid-save {killed_mid_save}"
    assert published < ITERS, f"seed {seed}: the killed runs already finished the training"

    # The last run resumes from the last published checkpoint and finishes (saving only at the end).
    job = ctx.Process(target=_job, args=(argv + MODE_FLAGS["async"] + ["--save-interval", "1000"], 2, result))
    job.start()
    job.join()
    assert job.exitcode == 0
    with open(result, "rb") as f:
        finished = pickle.load(f)
    assert [it for it, _, _ in finished] == list(range(published + 1, ITERS + 1))
    assert _tracker(root) == ITERS
    straight = run_pretrain(tiny_argv(DROPOUT + LAYOUT, iters=ITERS), world_size=2)
    assert finished == straight[published:], f"seed {seed}"


def _child_sees_queue(conn):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    conn.send(filesystem_async._results_queue is None)


def test_forked_ranks_do_not_share_the_parents_writer_queue():
    """megatron-core keeps one writer-result queue per process (a module
    variable); a process forked from one that has it (ranks from a launcher,
    or from this test session after a conversion) must make its own, or ranks
    would read each other's write results."""
    import megatron.training.checkpoint.torch_dist  # noqa: F401 - registers the after-fork hook
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    parent_queue = filesystem_async._get_write_results_queue()
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_sees_queue, args=(send,))
    child.start()
    assert receive.recv() is True
    child.join()
    assert filesystem_async._results_queue is parent_queue
    parent_queue.put("still usable")
    assert parent_queue.get() == "still usable"


class _FullDisk:
    """A data file on a disk that fills up after `room` more bytes: its write
    raises ENOSPC as the file system's would, from inside torch.save (which
    writes the tensor entries and turns any error of the stream into
    "[enforce fail at inline_container.cc:672] . unexpected pos")."""

    def __init__(self, stream, room):
        self._stream, self._room = stream, room

    def write(self, data):
        import errno

        self._room -= memoryview(data).nbytes
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _save_with_a_full_disk(rank, world_size, argv, full_on_rank):
    """pretrain_gpt.main; on `full_on_rank`, megatron-core's writers meet a full
    disk in the checkpoint of iteration 4, in the middle of a tensor entry.
    Returns the CheckpointError's message."""
    import functools
    import sys

    from tests.distributed.launcher import ROOT

    sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.training.errors import CheckpointError
    from megatron.training.initialize import destroy

    if rank == full_on_rank:
        import torch

        real = filesystem_async._write_item

        @functools.wraps(real)  # megatron-core passes arguments by the signature it sees
        def full_disk(*args, **kwargs):
            i, stream = next((i, a) for i, a in enumerate(args) if hasattr(a, "write") and hasattr(a, "name"))
            if "iter_0000004" in stream.name and any(isinstance(a, torch.Tensor) for a in args):
                args = args[:i] + (_FullDisk(stream, 100),) + args[i + 1:]  # full within the tensor's torch.save
            return real(*args, **kwargs)

        filesystem_async._write_item = full_disk
    try:
        pretrain_gpt.main(list(argv))
        return None
    except CheckpointError as e:
        return str(e)
    finally:
        destroy()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_on_one_rank_stops_every_rank_with_one_error(tmp_path, mode):
    """...and says the disk is full, naming the file, though the write failed
    inside torch.save. The save before it, with --ckpt-checksum, recorded the
    SHA-256 of every file its writers (two ranks, two per rank) and rank 0
    wrote, in sha256sum's format, with nothing else left behind."""
    import subprocess

    from tests.distributed.launcher import run_distributed

    root = str(tmp_path / "ckpt")
    argv = tiny_argv(LAYOUT + ["--save", root, "--save-interval", "2", "--ckpt-checksum"], iters=4) + MODE_FLAGS[mode]
    errors = run_distributed(_save_with_a_full_disk, world_size=2, args=(argv, 1))
    assert errors[0] == errors[1], "every rank stops with the same error"
    written = re.escape(root) + r"/iter_0000004\.partial\.[0-9a-f]{8}/__1_[01]\.distcp"  # rank 1's, mid-tensor
    assert re.fullmatch(f"saving iteration 4 to {re.escape(root)} failed: {written}: " + re.escape(
        "No space left on device; the disk is full: free space, or write to another disk (--save); the partial save "
        "was removed and iteration 2 is still the latest checkpoint"), errors[0]), errors[0]
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert _tracker(root) == 2
    saved = os.path.join(root, "iter_0000002")
    files = sorted(os.listdir(saved))
    assert files == [".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp", "checksums.sha256",
                     "common.pt", "metadata.json"]
    check = subprocess.run(["sha256sum", "-c", "checksums.sha256"], cwd=saved, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(files) - 1, check.stdout
