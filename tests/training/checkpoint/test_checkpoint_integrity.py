"""Checkpoints under damage and full disks (issue #15, findings 3 and 5, and
--ckpt-checksum): a load failure is one line naming the file and the
iteration to resume from instead; a failed save stops every rank with one
error and leaves the previous checkpoint; leftovers of killed saves are
swept; a flipped byte inside a tensor is caught by the checksums."""

import errno
import os
import shutil
import subprocess
import time

import pytest

from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain

BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4", "--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
# The per-rank torch format's files (torch_dist's integrity: tests/training/checkpoint/torch_dist/).
ARGV = TINY_LLAMA + MOCK_DATA + SCHEDULE + BATCH + ["--train-iters", "4", "--ckpt-format", "torch"]
RANK_DIR = os.path.join("iter_{:07d}", "mp_rank_00")


def _runs(rank, world_size, runs, fail_save_on_rank=None):
    """pretrain_gpt.main for each argv in turn; per run the logged
    (iteration, loss) pairs, or the CheckpointError's message. With
    `fail_save_on_rank`, that rank's checkpoint file of iteration 4 fails to
    write with ENOSPC."""
    import sys

    sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training.checkpoint import torch_format
    from megatron.training.errors import CheckpointError
    from megatron.training.initialize import destroy

    if rank == fail_save_on_rank:
        real = torch_format.atomic_torch_save

        def full_disk(obj, path, *rest):
            if "iter_0000004" in path:
                raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp-1")
            return real(obj, path, *rest)

        torch_format.atomic_torch_save = full_disk
    out = []
    for argv in runs:
        try:
            state = pretrain_gpt.main(list(argv))
            out.append([(h["iteration"], h["lm loss"]) for h in state.history])
        except CheckpointError as e:
            out.append(str(e))
        finally:
            destroy()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint root with iterations 2 and 4 saved with --ckpt-checksum, the run's losses)."""
    ckpt = str(tmp_path_factory.mktemp("saved") / "ckpt")
    losses = run_pretrain(ARGV + ["--save", ckpt, "--save-interval", "2", "--ckpt-checksum"])
    return ckpt, [(it, loss) for it, loss, _ in losses]


def _copy(saved, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(saved[0], dst)
    return dst


def _flip_a_byte_of_the_output_layer(path):
    """Flip one byte (a float's exponent) in the middle of the output layer's
    weights inside a torch.save file: every logit depends on it."""
    import torch

    weights = torch.load(path, weights_only=True, mmap=True)["model"]["output_layer.weight"].numpy().tobytes()
    with open(path, "rb") as f:
        offset = f.read().find(weights) + len(weights) // 2 + 3  # the high byte of a little-endian float32
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture(scope="module")
def loads(saved, tmp_path_factory):
    """Damaged copies of `saved`, each loaded in one launch: {scenario: (root, result)}."""
    tmp = tmp_path_factory.mktemp("damaged")
    roots = {name: _copy(saved, tmp, name) for name in ("truncated", "binary", "checked", "unchecked")}
    bad = os.path.join(roots["truncated"], RANK_DIR.format(4), "model_optim_rng.pt")
    os.truncate(bad, os.path.getsize(bad) // 2)
    os.remove(os.path.join(roots["truncated"], RANK_DIR.format(4), "checksums.sha256"))  # torch.load meets it first
    with open(os.path.join(roots["binary"], "latest_checkpointed_iteration.txt"), "wb") as f:
        f.write(b"\x89\x00\xff\x13")
    for name in ("checked", "unchecked"):
        rank_dir = os.path.join(roots[name], RANK_DIR.format(2))
        assert subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=rank_dir).returncode == 0
        _flip_a_byte_of_the_output_layer(os.path.join(rank_dir, "model_optim_rng.pt"))
    os.remove(os.path.join(roots["unchecked"], RANK_DIR.format(2), "checksums.sha256"))
    scenarios = {"truncated": ("truncated", []), "truncated_step2": ("truncated", ["--ckpt-step", "2"]),
                 "binary": ("binary", []), "binary_step2": ("binary", ["--ckpt-step", "2"]),
                 "checked": ("checked", ["--ckpt-step", "2"]), "unchecked": ("unchecked", ["--ckpt-step", "2"])}
    runs = [ARGV + ["--load", roots[root]] + extra for root, extra in scenarios.values()]
    results = run_distributed(_runs, world_size=1, args=(runs,))[0]
    return {name: (roots[root], result) for (name, (root, _)), result in zip(scenarios.items(), results)}


def test_damaged_checkpoints_name_the_file_and_the_iteration_that_loads(saved, loads):
    (truncated, truncated_error), (binary, binary_error) = loads["truncated"], loads["binary"]
    for message in (truncated_error, binary_error):
        assert isinstance(message, str) and "\n" not in message, message
    bad = os.path.join(truncated, RANK_DIR.format(4), "model_optim_rng.pt")
    assert truncated_error.startswith(f"{bad} cannot be loaded (PytorchStreamReader failed")
    assert "the file is truncated or corrupt" in truncated_error
    assert f"Iteration 2 ({truncated}/iter_0000002) is complete: resume from it with --ckpt-step 2" in truncated_error
    tracker = os.path.join(binary, "latest_checkpointed_iteration.txt")
    assert binary_error.startswith(f"{tracker} holds binary data, not an iteration number")
    assert f"Iteration 4 ({binary}/iter_0000004) is complete: resume from it with --ckpt-step 4" in binary_error
    # The named command works, and the resumed run is the uninterrupted one exactly.
    assert loads["truncated_step2"][1] == loads["binary_step2"][1] == saved[1][2:]


def test_checksums_catch_a_flipped_byte_inside_a_tensor(saved, loads):
    checked, error = loads["checked"]
    rank_dir = os.path.join(checked, RANK_DIR.format(2))
    assert subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], capture_output=True,
                          cwd=rank_dir).returncode != 0  # the manifest is sha256sum's format
    assert isinstance(error, str) and error.startswith(f"{rank_dir}/model_optim_rng.pt: its SHA-256 "), error
    assert "recorded in checksums.sha256" in error and "resume from it" not in error  # nothing older is complete
    # Without checksums the damaged weights load silently and train on: other losses.
    silent = loads["unchecked"][1]
    assert [it for it, _ in silent] == [3, 4] and silent != saved[1][2:]


def test_a_failed_save_stops_every_rank_and_leftovers_of_killed_saves_are_swept(tmp_path):
    ckpt = tmp_path / "ckpt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        stale = [ckpt / f"latest_checkpointed_iteration.txt.tmp-{dead.pid}",
                 ckpt / "iter_0000009.partial" / "mp_rank_00" / f"model_optim_rng.pt.tmp-{dead.pid}"]
        kept = ckpt / "iter_0000007.partial" / "mp_rank_01" / f"model_optim_rng.pt.tmp-{live.pid}"
        for path in stale + [kept]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 100)
        results = run_distributed(_runs, world_size=2, args=([
            ARGV + ["--tensor-model-parallel-size", "2", "--save", str(ckpt), "--save-interval", "2"]], 1))
        left = sorted(os.listdir(ckpt))
    finally:
        live.kill()
    errors = [r[0] for r in results]
    assert errors[0] == errors[1], "every rank stops with the same error"
    assert errors[0] == (f"saving iteration 4 to {ckpt} failed: {ckpt}/iter_0000004.partial/mp_rank_01/"
                         f"model_optim_rng.pt.tmp-1: No space left on device; the disk is full: free space, or write "
                         f"to another disk (--save); the partial save was removed and iteration 2 is still the latest checkpoint")
    assert left == ["iter_0000002", "iter_0000007.partial", "latest_checkpointed_iteration.txt"]
    assert os.path.exists(kept)
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "2"


def test_a_really_full_disk_during_a_save(tmp_path):
    """A 3 MB tmpfs holds one checkpoint of the tiny model (~2.4 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root and mount to make a small file system (the injected ENOSPC test covers the logic)")
    try:
        error, = run_distributed(_runs, world_size=1, args=([ARGV + ["--save", str(disk), "--save-interval", "2"]],))[0]
        assert isinstance(error, str), error
        assert error.startswith(f"saving iteration 4 to {disk} failed: {disk}/iter_0000004.partial/mp_rank_00/"), error
        assert "No space left on device; the disk is full" in error and "iteration 2 is still the latest" in error
        assert sorted(os.listdir(disk)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    finally:
        subprocess.run(["umount", str(disk)])
