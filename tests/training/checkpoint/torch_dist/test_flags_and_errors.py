"""The distributed-checkpoint flags (Megatron-LM's names), the errors a
torch_dist load gives when a checkpoint cannot serve the run, and the entry
points' `__main__` guards (megatron-core's writer starts a spawned process,
which re-imports the entry point: importing it must not train)."""

import argparse
import ast
import glob
import os

import pytest

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.errors import CheckpointError
from tests.distributed.launcher import ROOT

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10",
        "--mock-data", "--vocab-size", "128"]


def check(argv):
    args = parse_args(BASE + argv)
    validate_args(args, 1)
    return args


def test_defaults_follow_megatron_lm():
    args = check([])
    assert args.ckpt_format == "torch_dist" and args.ckpt_fully_parallel_save and not args.async_save
    assert args.dist_ckpt_optim_fully_reshardable and not args.ckpt_fully_parallel_load
    assert not check(["--no-ckpt-fully-parallel-save"]).ckpt_fully_parallel_save
    assert check(["--ckpt-fully-parallel-save"]).ckpt_fully_parallel_save
    assert not check(["--no-dist-ckpt-optim-fully-reshardable"]).dist_ckpt_optim_fully_reshardable
    # --ckpt-checksum works with either format (torch_dist: tests/training/checkpoint/torch_dist/test_integrity.py)
    assert check(["--ckpt-checksum"]).ckpt_checksum and check(["--ckpt-checksum", "--async-save"]).async_save


@pytest.mark.parametrize("argv,message", [
    (["--ckpt-format", "torch", "--async-save"], "--async-save needs --ckpt-format torch_dist"),
    (["--async-save", "--use-persistent-ckpt-worker"], "--use-persistent-ckpt-worker needs CUDA"),
])
def test_flag_combinations_that_cannot_work(argv, message):
    with pytest.raises(ArgumentError, match=message):
        check(argv)


def _run_args(**overrides):
    values = dict(use_distributed_optimizer=True, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
                  swiglu=True, untie_embeddings_and_output_weights=True, add_bias_linear=False,
                  group_query_attention=True, num_query_groups=2)
    return argparse.Namespace(**dict(values, **overrides))


@pytest.mark.parametrize("common,saved,same_tp_pp,message", [
    ({"iteration": 5}, {}, True, r"saved without optimizer state \(--no-save-optim\): load it with --no-load-optim"),
    ({"iteration": 5, "optimizer": {}}, {"use_distributed_optimizer": False}, True,
     "was saved without --use-distributed-optimizer, and this run is with it"),
    ({"iteration": 5, "optimizer": {}, "content_metadata": {"distrib_optim_sharding_type": "dp_reshardable"}},
     {"use_distributed_optimizer": True, "tensor_model_parallel_size": 2}, False,
     r"'dp_reshardable', which loads only under the TP and PP it was saved with \(TP=2 PP=1 VP=1\)"),
])
def test_optimizer_state_the_checkpoint_cannot_give(common, saved, same_tp_pp, message):
    from megatron.training.checkpoint.torch_dist.load import _wants_optimizer

    with pytest.raises(CheckpointError, match=message):
        _wants_optimizer(common, saved, _run_args(), "CKPT", same_tp_pp)


def test_an_initial_checkpoint_has_no_optimizer_state_to_load():
    from megatron.training.checkpoint.torch_dist.load import _wants_optimizer

    assert _wants_optimizer({"iteration": 0}, {}, _run_args(), "CKPT", True) is False


def test_another_model_is_named_with_its_flags():
    from megatron.training.checkpoint.torch_dist.load import _check_model_shape

    saved = vars(_run_args(hidden_size=128, num_query_groups=4))
    with pytest.raises(CheckpointError, match=r"--hidden-size 128 \(this run: 64\); 4 query groups \(this run: 2\)"):
        _check_model_shape(saved, _run_args(), "CKPT")
    _check_model_shape(vars(_run_args()), _run_args(), "CKPT")


ENTRY_POINTS = sorted(
    [os.path.join(ROOT, name) for name in ("pretrain_gpt.py", "finetune_gpt.py", "finetune.py")]
    + [os.path.join(ROOT, "tasks", "main.py")]
    + [p for pattern in ("tools/*.py", "tools/*/*.py", "benchmarks/*.py")
       for p in glob.glob(os.path.join(ROOT, pattern)) if "def main(" in open(p).read()])


def _is_guard(node) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)


def _harmless(node) -> bool:
    """Imports, definitions, constants, the docstring, sys.path set-up, optional imports."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
        return True
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Constant) or ast.unparse(node.value).startswith("sys.path.")
    return isinstance(node, ast.Try) and all(_harmless(n) for n in node.body)


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_entry_points_do_nothing_when_imported(path):
    tree = ast.parse(open(path).read())
    assert any(_is_guard(node) for node in tree.body), f"{path} has no `if __name__ == \"__main__\":` guard"
    work = [ast.unparse(node).splitlines()[0] for node in tree.body if not _is_guard(node) and not _harmless(node)]
    assert not work, f"{path} runs code when imported (a spawned writer process re-imports it): {work}"
