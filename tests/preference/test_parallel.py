"""finetune_dpo.py under parallel layouts reproduces the single-process run
(fp32, CPU, gloo), and precomputed reference log-probs give the live
reference's losses.

Single process: a full fine-tune with a frozen reference copy (--ref-load
the reference, --load a policy that differs from it), the same with
--pref-reference precomputed (the log-probs computed first, by one pass of
the reference), and LoRA adapters (reference = adapters off). Four
processes, one launch: the copy run at TP=2 x PP=2 with sequence
parallelism (the reference's activations travel beside the policy's between
stages), the adapter run at TP=2 x DP=2, and the precomputed run at PP=2 x
DP=2 on a fresh copy of the data, so the precomputing pass itself runs
pipelined and data-parallel. Tolerance: 1e-5 relative on every iteration's
loss and reward margin (only the order of reductions differs); the
precomputed log-probs equal the single-process ones to 1e-6 relative. The
single-process copy run also writes TensorBoard: TRL's metric names are its tags.
"""

import os
import shutil

import numpy as np
import pytest

from tests.preference.conftest import driver_flags
from tests.training.pretrain_runner import run_pretrain_sequence

ITERS = 3
RTOL = 1e-5
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lora-target-modules", "all-linear"]
TP2, PP2 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]


FIELDS = ("loss", "rewards/margins", "rewards/accuracies")  # per iteration, after the iteration number


def _flags(tiny, kind, data, extra=()):
    common = ["--train-iters", str(ITERS), "--global-batch-size", "8", "--lr", "5e-3", *extra]
    if kind == "adapters":
        return driver_flags(tiny["reference"], data, LORA + common)
    reference = ["--pref-reference", kind, "--ref-load", tiny["reference"]]
    return driver_flags(tiny["policy"], data, reference + common)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    fresh = str(tmp_path_factory.mktemp("fresh") / "train")
    for name in os.listdir(os.path.dirname(tiny["train"])):
        if name.startswith("train_pair"):
            shutil.copy(os.path.join(os.path.dirname(tiny["train"]), name), os.path.dirname(fresh))
    board = str(tmp_path_factory.mktemp("tensorboard"))
    single = run_pretrain_sequence([_flags(tiny, k, tiny["train"], ["--tensorboard-dir", board] if k == "copy" else [])
                                    for k in ("copy", "precomputed", "adapters")], 1, "finetune_dpo", FIELDS)
    parallel = run_pretrain_sequence([
        _flags(tiny, "copy", tiny["train"], TP2 + PP2 + ["--sequence-parallel"]),
        _flags(tiny, "adapters", tiny["train"], TP2 + ["--sequence-parallel"]),
        _flags(tiny, "precomputed", fresh, PP2),
    ], 4, "finetune_dpo", FIELDS)
    return dict(zip(("copy", "precomputed", "adapters"), single)), dict(zip(("copy", "adapters", "precomputed"),
                                                                             parallel)), fresh, board


def _same(got, want, what, rtol=RTOL):
    assert [it for it, *_ in got] == list(range(1, ITERS + 1)) == [it for it, *_ in want], what
    for (it, loss, margin, acc), (_, loss0, margin0, acc0) in zip(got, want):
        assert loss == pytest.approx(loss0, rel=rtol), f"{what}: iteration {it} loss {loss} vs {loss0}"
        assert margin == pytest.approx(margin0, rel=rtol, abs=1e-7), f"{what}: iteration {it} margin"
        assert acc == acc0, f"{what}: iteration {it} reward accuracy {acc} vs {acc0}"


def test_precomputed_reference_gives_the_live_reference_loss(runs):
    single, *_ = runs
    _same(single["precomputed"], single["copy"], "precomputed vs live copy")
    assert single["copy"][0][2] != 0.0  # the policy differs from the reference from the first step on
    assert single["copy"][-1][1] < single["copy"][0][1]  # and training lowers the loss


def test_tp2_pp2_with_sequence_parallel_reproduces_one_process(runs):
    single, parallel, *_ = runs
    _same(parallel["copy"], single["copy"], "TP=2 x PP=2 (SP), frozen copy")


def test_dp2_with_adapters_reproduces_one_process(runs):
    single, parallel, *_ = runs
    _same(parallel["adapters"], single["adapters"], "TP=2 x DP=2 (SP), adapters off as the reference")
    assert single["adapters"][-1][2] > 0  # the adapters learn: chosen rewards move above rejected ones


def test_precomputing_under_pp2_dp2_gives_the_same_log_probs(runs, tiny):
    single, parallel, fresh, _ = runs
    _same(parallel["precomputed"], single["precomputed"], "PP=2 x DP=2, precomputed")
    with np.load(fresh + "_ref_logps.npz") as got, np.load(tiny["train"] + "_ref_logps.npz") as want:
        np.testing.assert_allclose(got["logps"], want["logps"], rtol=1e-6)
        assert str(got["fingerprint"]) == str(want["fingerprint"])


def test_trl_named_metrics_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    single, *_, board = runs
    events = EventAccumulator(board)
    events.Reload()
    for tag in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, ITERS + 1)), tag
    assert [e.value for e in events.Scalars("rewards/margins")] == pytest.approx([m for _, _, m, _ in single["copy"]])
