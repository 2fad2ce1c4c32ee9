"""Training throughput of the driver on one GPU: tokens/s, TFLOP/s (the
driver's model-FLOPs count) and MFU against the GPU's dense bf16 peak.

    python benchmarks/gpu_throughput.py --config 1b --warmup 3 --iters 10 [--out benchmarks/results/gpu_throughput_H100.md]
    python benchmarks/gpu_throughput.py --config tiny --iters 2      # smoke run (also on CPU)

Each configuration trains on mock data through `megatron.training.training.train`
(bf16 on GPU, the distributed optimizer, --use-flash-attn) for warm-up + timed
iterations; only the timed iterations count. The report names the attention
path that ran (Transformer Engine or local + SDPA) and the versions.

Not yet here (issue 9): `--compare-megatron-lm PATH` and fused RMSNorm / SwiGLU /
RoPE / cross-entropy kernels; this script is the measuring half.
"""

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--use-flash-attn", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--group-query-attention"]

# name -> (flags, micro batch, global batch)
CONFIGS = {
    "tiny": (["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "352", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--seq-length", "128", "--max-position-embeddings", "128",
              "--vocab-size", "1024"], 2, 4),
    # ~1.2B, Llama-3.2-1B-like shape, sequence 4096.
    "1b": (["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192", "--num-attention-heads", "32",
            "--num-query-groups", "8", "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--vocab-size", "128256", "--rotary-base", "500000"], 2, 16),
    # ~7B Llama-2 shape with GQA, sequence 4096, selective recomputation.
    "7b": (["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "11008", "--num-attention-heads", "32",
            "--num-query-groups", "8", "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--vocab-size", "32000", "--recompute-activations"], 1, 8),
}


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def peak_tflops(name: str):
    from megatron.training.flops import PEAK_BF16_TFLOPS

    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def run(config: str, warmup: int, iters: int) -> dict:
    import torch

    from driver_harness import DriverHarness
    from megatron.training.flops import ModelShape, flops_per_iteration, throughput
    from megatron.training.models.llama import attention_backend_name

    flags, mbs, gbs = CONFIGS[config]
    precision = ["--bf16", "--use-distributed-optimizer"] if torch.cuda.is_available() else []
    argv = LLAMA + flags + precision + [
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-4", "--mock-data",
        "--train-iters", str(warmup + iters), "--log-interval", "1000000", "--eval-iters", "0",
        "--eval-interval", "1000000"]
    harness = DriverHarness(argv)
    args, model = harness.args, harness.model

    def block(n):
        harness.train_block(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    block(warmup)
    t0 = time.perf_counter()
    block(iters)
    seconds = (time.perf_counter() - t0) / iters
    flops = flops_per_iteration(ModelShape.from_args(args), args.global_batch_size, args.seq_length)
    # the training log's figures (flops.throughput) for the one GPU this benchmark runs on
    tput = throughput(flops, seconds, args.global_batch_size * args.seq_length, world_size=1)
    name = gpu_name()
    peak = peak_tflops(name)
    return {
        "config": config, "gpu": name, "attention": attention_backend_name(args),
        "params_b": sum(p.numel() for c in model for p in c.parameters()) / 1e9,
        "ms_per_iteration": seconds * 1e3, "tokens_per_s": tput.tokens_per_second_per_gpu,
        "tflops": tput.tflops_per_gpu, "mfu": tput.tflops_per_gpu / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=list(CONFIGS), default="1b")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    import megatron.core
    import torch

    r = run(opts.config, opts.warmup, opts.iters)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "n/a"
    report = "\n".join([
        f"# Training throughput, config {r['config']} on {r['gpu']}",
        "",
        f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
        f"CUDA {torch.version.cuda or 'none'}; attention: {r['attention']}; "
        f"{opts.warmup} warm-up + {opts.iters} timed iterations.",
        "",
        "| config | params (B) | ms/iter | tokens/s/GPU | TFLOP/s/GPU | MFU | max memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {r['config']} | {r['params_b']:.2f} | {r['ms_per_iteration']:.1f} | {r['tokens_per_s']:.0f} | "
        f"{r['tflops']:.1f} | {mfu} | {mem} |",
    ]) + "\n"
    from bench_report import emit

    emit(report, opts.out)


if __name__ == "__main__":
    main()
