"""Every parallel layout reproduces the single-process loss curve (fp32, CPU, gloo).

All runs start from one initial checkpoint saved by a single process; the
parallel runs load it resharded (--finetune), so they start from the same
weights and see the same global batches in the same order.
"""

import pytest

from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain

ITERS = 6
# fp32 on CPU: the layouts differ only in the order of reductions (all-reduce,
# split matmuls), so losses agree to ~1e-6 relative; 1e-5 leaves headroom
# while still catching any real difference (a wrong shard or a dropped
# gradient moves the loss by >1e-3 within a few steps).
RTOL = 1e-5


TIED = [a for a in TINY_LLAMA if a != "--untie-embeddings-and-output-weights"]


def _model(tied):
    return TIED if tied else TINY_LLAMA


def _init_checkpoint(path, tied):
    run_pretrain(_model(tied) + MOCK_DATA + SCHEDULE + ["--micro-batch-size", "2", "--global-batch-size", "8",
                                                         "--train-iters", "0", "--save", path])
    return path


def _train(ckpt, world_size, layout, tied=False):
    argv = _model(tied) + MOCK_DATA + SCHEDULE + [
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--load", ckpt, "--finetune"] + layout
    losses = run_pretrain(argv, world_size)
    assert len(losses) == ITERS
    return losses


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    return {tied: _init_checkpoint(str(root / f"tied{int(tied)}"), tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def references(checkpoints):
    refs = {tied: _train(checkpoints[tied], 1, [], tied) for tied in (False, True)}
    for losses in refs.values():
        assert losses[-1][1] < losses[0][1], "the reference run should learn"
    return refs


LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    "pp2_interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "tp2_sequence_parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    # Tied embeddings: the last stage holds a copy of the word embeddings, kept in sync by megatron-core.
    "pp2_tied_embeddings": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_overlap_grad_reduce": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, checkpoints, references):
    world_size, layout = LAYOUTS[name]
    tied = "tied" in name
    reference = references[tied]
    losses = _train(checkpoints[tied], world_size, layout, tied)
    assert [it for it, _, _ in losses] == [it for it, _, _ in reference]
    for (it, ref, ref_gn), (_, got, gn) in zip(reference, losses):
        assert got == pytest.approx(ref, rel=RTOL), f"{name}: iteration {it} loss {got} vs single-process {ref}"
        assert gn == pytest.approx(ref_gn, rel=1e-4), f"{name}: iteration {it} grad norm {gn} vs {ref_gn}"
