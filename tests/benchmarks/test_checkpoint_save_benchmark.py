"""benchmarks/checkpoint_save.py at a tiny size: its save and load phases run
in-process on two gloo ranks (the command line runs them under torchrun),
with the offline conversion between them, and the report has every row."""

import importlib.util
import os
import re

from tests.distributed.launcher import ROOT, run_distributed

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "32", "--rounds", "1"]


def _benchmark():
    path = os.path.join(ROOT, "benchmarks", "checkpoint_save.py")
    spec = importlib.util.spec_from_file_location("checkpoint_save_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _phases(rank, world_size, argv, work):
    import sys

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # its sibling imports, as when run as a script
    bench = _benchmark()
    args = bench.build_parser().parse_args(argv)
    saved = bench.phase_save(args, work)
    if rank == 0:
        from tools.checkpoint import util

        assert util.main(["--model-type", "GPT", "--load-dir", os.path.join(work, "saved_torch"), "--save-dir",
                          os.path.join(work, "converted"), "--target-tensor-parallel-size", "1",
                          "--target-pipeline-parallel-size", "2"]) == 0
    torch.distributed.barrier()
    loads = bench.phase_load(args, work)
    return bench.report(args, saved, 1.5, loads) if rank == 0 else None


def test_tiny_run_reports_every_format_and_load(tmp_path):
    text = run_distributed(_phases, world_size=2, args=(TINY, str(tmp_path)))[0]
    rows = re.findall(r"^\| (torch[^|,]*?) \| [\d.]+ \| [\d.]+ \| [\d,.]+ \| [\d.]+ \|$", text, re.M)
    assert rows == ["torch", "torch_dist", "torch_dist --async-save"]
    for mode in rows:
        blocked, published = map(float, re.search(rf"^\| {re.escape(mode)} \| ([\d.]+) \| ([\d.]+) \|", text,
                                                  re.M).groups())
        assert 0 < blocked <= published
    assert re.search(r"\| torch_dist, loaded directly \(model \+ optimizer state\) \| [\d.]+ \|", text)
    assert re.search(r"\| torch, resharded while loading \(weights only, --finetune\) \| [\d.]+ \|", text)
    assert re.search(r"\| torch, converted offline, then loaded \(weights only\) \| [\d.]+ \(conversion 1.50 \+ "
                     r"load [\d.]+\) \|", text)
    assert sorted(os.listdir(tmp_path)) == ["converted", "saved_torch", "saved_torch_dist"]
