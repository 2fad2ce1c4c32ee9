"""A torch_dist checkpoint shared by the tests of this folder."""

import os

import pytest

from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain

BATCH = ["--micro-batch-size", "2", "--global-batch-size", "8"]
TP2_DISTOPT = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
SAVED_AT, ITERS = 4, 6


def tiny_argv(extra, iters=ITERS):
    """pretrain_gpt.py flags of the tiny Llama on mock data (no dropout)."""
    return TINY_LLAMA + MOCK_DATA + SCHEDULE + BATCH + ["--train-iters", str(iters)] + list(extra)


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory):
    """(checkpoint root, losses of iterations 5-6): one uninterrupted TP=2 run
    with the distributed optimizer that saves torch_dist checkpoints at
    iterations 4 and 6, with --ckpt-checksum (checksums.sha256: a load verifies
    it only when given --ckpt-checksum too); the tracker is then pointed back
    at iteration 4, so resumes continue from there and the run's own
    iterations 5-6 are the uninterrupted reference (saving does not change
    the training state)."""
    ckpt = str(tmp_path_factory.mktemp("dist") / "ckpt")
    losses = run_pretrain(tiny_argv(TP2_DISTOPT + ["--save", ckpt, "--save-interval", str(SAVED_AT),
                                                   "--ckpt-checksum"]), world_size=2)
    assert [it for it, _, _ in losses] == list(range(1, ITERS + 1))
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert {"metadata.json", "common.pt", ".metadata", "checksums.sha256"} <= set(
        os.listdir(os.path.join(ckpt, "iter_0000004")))
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(SAVED_AT))
    return ckpt, losses[SAVED_AT:]
