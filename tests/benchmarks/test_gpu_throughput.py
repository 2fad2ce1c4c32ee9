"""The GPU throughput benchmark runs end to end (tiny config on CPU; the real
sizes need a GPU and are run by benchmarks/gpu_session.sh, results in
benchmarks/results/), and its Megatron-LM side builds the same model's flags
and reads Megatron-LM's log."""

import sys

import pytest
import torch

from megatron.training.flops import ModelShape, flops_per_iteration
from tests.distributed.launcher import ROOT, run_distributed

sys.path.insert(0, ROOT + "/benchmarks")
import gpu_throughput  # noqa: E402


def _run(rank, world_size, config, iters, kernels):
    from megatron.training.initialize import destroy

    try:
        return gpu_throughput.run(config, 1, iters, kernels)
    finally:
        destroy()


def test_tiny_config_reports_the_drivers_flops_over_the_measured_time():
    r = run_distributed(_run, 1, args=("tiny", 2, "off"))[0]
    # The tiny config: 2 layers, hidden 128, ffn 352, 4 heads / 2 groups, vocab 1024, global batch 4 x seq 128.
    shape = ModelShape(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                       num_query_groups=2, kv_channels=32, padded_vocab_size=1024, swiglu=True)
    expected = flops_per_iteration(shape, 4, 128) / (r["ms_per_iteration"] / 1e3) / 1e12
    assert r["tflops"] == pytest.approx(expected, rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx(4 * 128 / (r["ms_per_iteration"] / 1e3), rel=1e-9)
    assert "SDPA" in r["attention"] or "Transformer Engine" in r["attention"]
    # The profiled iteration names the SDPA kernel torch ran (its CPU flash kernel here) ...
    if not torch.cuda.is_available():
        assert r["profile"]["sdpa"] == ["flash (CPU)"]
    assert r["profile"]["top"] and all(ms >= 0 for _, ms in r["profile"]["top"])
    # ... and --kernels off turned this repo's kernels off.
    assert "RoPE: unfused" in r["kernel_paths"] and "cross-entropy: unfused" in r["kernel_paths"]


def test_megatron_lm_gets_the_same_model_and_batch_with_the_local_spec():
    argv = gpu_throughput.megatron_lm_argv("1b", 13)
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert (value("--num-layers"), value("--hidden-size"), value("--ffn-hidden-size"), value("--num-query-groups"),
            value("--seq-length"), value("--micro-batch-size"), value("--global-batch-size")) == (
        "16", "2048", "8192", "8", "4096", "2", "16")
    # NullTokenizer adds one id: 128255 + 1 = the driver's 128256 rows.
    assert value("--vocab-size") == "128255" and value("--transformer-impl") == "local"
    assert {"--swiglu", "--bf16", "--use-distributed-optimizer", "--untie-embeddings-and-output-weights",
            "--disable-bias-linear", "--no-gradient-accumulation-fusion"} <= set(argv)
    assert "--use-flash-attn" not in argv  # Megatron-LM's local spec has no SDPA path


def test_megatron_lm_log_is_averaged_after_the_warm_up():
    log = "\n".join(
        f" [2026-12-01 10:00:0{i}.000000] iteration {i:8d}/{5:8d} | consumed samples: {16 * i:12d} | "
        f"elapsed time per iteration (ms): {ms:.1f} | throughput per GPU (TFLOP/s/GPU): 400.0 |"
        for i, ms in enumerate([9000.0, 1200.0, 1000.0, 1100.0, 900.0], start=1))
    assert gpu_throughput.parse_megatron_lm_log(log, warmup=2) == pytest.approx(1000.0)
    with pytest.raises(RuntimeError, match="no Megatron-LM iteration line"):
        gpu_throughput.parse_megatron_lm_log("Traceback ...", warmup=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_kernels_and_a_fused_sdpa_backend_run_on_gpu():
    # The tiny config (the 1b and largest ones are benchmarks/gpu_session.sh's throughput steps).
    r = run_distributed(_run, 1, args=("tiny", 3, "on"))[0]
    assert r["mfu"] is not None and 0.0 < r["mfu"] < 1.0
    from megatron.training.kernels.capabilities import detect

    if not detect().transformer_engine:  # the pip path: this repo's kernels
        assert "RoPE: Triton, ours" in r["kernel_paths"] and "cross-entropy: Liger" in r["kernel_paths"]
    assert set(r["profile"]["sdpa"]) & {"cuDNN", "FlashAttention-2", "memory-efficient"}
