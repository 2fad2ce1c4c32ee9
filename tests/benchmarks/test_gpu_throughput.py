"""The GPU throughput benchmark runs end to end (tiny config on CPU; the real
sizes need a GPU and are run by hand, results in benchmarks/results/)."""

import sys

import pytest
import torch

from megatron.training.flops import ModelShape, flops_per_iteration
from tests.distributed.launcher import ROOT, run_distributed


def _run(rank, world_size, config, iters):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, ROOT + "/benchmarks")
    import gpu_throughput
    from megatron.training.initialize import destroy

    try:
        return gpu_throughput.run(config, 1, iters)
    finally:
        destroy()


def test_tiny_config_reports_the_drivers_flops_over_the_measured_time():
    r = run_distributed(_run, 1, args=("tiny", 2))[0]
    # The tiny config: 2 layers, hidden 128, ffn 352, 4 heads / 2 groups, vocab 1024, global batch 4 x seq 128.
    shape = ModelShape(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                       num_query_groups=2, kv_channels=32, padded_vocab_size=1024, swiglu=True)
    expected = flops_per_iteration(shape, 4, 128) / (r["ms_per_iteration"] / 1e3) / 1e12
    assert r["tflops"] == pytest.approx(expected, rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx(4 * 128 / (r["ms_per_iteration"] / 1e3), rel=1e-9)
    assert "SDPA" in r["attention"] or "Transformer Engine" in r["attention"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_1b_config_reports_mfu_on_gpu():
    r = run_distributed(_run, 1, args=("1b", 3))[0]
    assert r["mfu"] is not None and 0.0 < r["mfu"] < 1.0
