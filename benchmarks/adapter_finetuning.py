"""Full fine-tuning vs LoRA vs QLoRA-4bit on the same model, batch and data,
on CPU, side by side in one run; then the planner's memory per GPU for
Llama-2-7B and -70B with each.

    python benchmarks/adapter_finetuning.py [--size cpu] [--blocks 3 --iters 4] \\
        [--out benchmarks/results/adapter_finetuning_cpu.md]

Each method trains in its own process (so each peak is its own) with the
driver itself (benchmarks/driver_harness.py), from one random base
checkpoint, on mock data:
- trainable parameters: those with requires_grad (the adapters, or all);
- training state: the bytes of every tensor the model (weights and
  quantized buffers), the gradient buffers and the optimizer hold, each
  storage counted once -- exact, and independent of the machine's load;
- peak RSS (the process's VmHWM, from /proc) and its rise over the RSS after
  the imports: RSS, not tracemalloc, because
  torch's CPU allocations are invisible to tracemalloc; the rise includes
  activations and the allocator's caching;
- tokens/s: the median of timed blocks after a warm-up block.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

SIZES = {
    # (layers, hidden, ffn, heads, query groups, seq, vocab, micro batch, global batch)
    "tiny": (2, 64, 128, 4, 2, 32, 256, 2, 4),
    "cpu": (8, 512, 1408, 8, 4, 256, 8192, 4, 8),
}
LORA = ["--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-target-modules", "all-linear"]
METHODS = {
    "full fine-tuning": [],
    "LoRA r=16, all-linear": LORA,
    "QLoRA 4-bit NF4, r=16, all-linear": LORA + ["--lora-quant-bits", "4"],
}


def model_flags(size: str) -> list:
    layers, hidden, ffn, heads, groups, seq, vocab, micro, global_batch = SIZES[size]
    return [
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
        "--num-attention-heads", str(heads), "--group-query-attention", "--num-query-groups", str(groups),
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--normalization", "RMSNorm", "--swiglu",
        "--use-rotary-position-embeddings", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--use-flash-attn", "--attention-dropout", "0", "--hidden-dropout", "0", "--transformer-impl", "local",
        "--mock-data", "--vocab-size", str(vocab), "--micro-batch-size", str(micro),
        "--global-batch-size", str(global_batch), "--lr", "1e-4", "--log-interval", "1000000",
        "--eval-interval", "1000000", "--eval-iters", "0", "--seed", "1234",
    ]


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(argv: list, blocks: int, iters: int) -> dict:
    """Train with the driver in this process; what `worker` reports."""
    sys.path.insert(0, HERE)
    import pretrain_gpt  # noqa: F401 - the imports (torch, megatron.core) before the baseline
    from driver_harness import DriverHarness, saved_activation_bytes, training_state_bytes

    rss_start = _proc_status_kib("VmRSS")
    harness = DriverHarness(argv)
    params = [p for chunk in harness.model for p in chunk.parameters()]
    harness.train_block(1)  # warm-up: first-touch allocations, optimizer state
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        harness.train_block(iters)
        times.append((time.perf_counter() - t0) / iters)
    rss_peak = _proc_status_kib("VmHWM")
    # last: it keeps every micro-batch's saved tensors alive until the iteration ends
    activations = saved_activation_bytes(harness)
    args = harness.args
    seconds = statistics.median(times)
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "parameters": sum(p.numel() for p in params),
        **training_state_bytes(harness.model, harness.optimizer), "activations": activations,
        "rss_start_mib": rss_start / 1024, "rss_peak_mib": rss_peak / 1024,
        "tokens_per_s": args.global_batch_size * args.seq_length / seconds,
        "ms_per_iteration": seconds * 1e3, "block_ms": [t * 1e3 for t in times],
    }


def base_argv(size: str, out_dir: str) -> list:
    """pretrain_gpt.py flags that write a random base checkpoint (iteration 0) to `out_dir`."""
    return model_flags(size) + ["--train-iters", "0", "--save", out_dir]


def method_argv(size: str, base: str, method: str) -> list:
    """The driver flags that fine-tune `base` with `method` (a METHODS key)."""
    return model_flags(size) + ["--load", base, "--finetune", "--train-iters", "1000000"] + METHODS[method]


def run_methods(size: str, base: str, blocks: int, iters: int) -> dict:
    """{method: measure(...)}, each method in a fresh process."""
    subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *base_argv(size, base)], check=True,
                   stdout=subprocess.DEVNULL)
    results = {}
    for name in METHODS:
        worker = json.dumps([method_argv(size, base, name), blocks, iters])
        out = subprocess.run([sys.executable, __file__, "--worker", worker], check=True, capture_output=True,
                             text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------- the planner for 7B / 70B

LLAMA2 = {  # layers, hidden, ffn, heads, groups
    "Llama-2-7B": (32, 4096, 11008, 32, 32),
    "Llama-2-70B": (80, 8192, 28672, 64, 8),
}
PLANS = [  # (model, world size, TP, PP, recompute)
    ("Llama-2-7B", 1, 1, 1, False),
    ("Llama-2-70B", 8, 8, 1, False),
    ("Llama-2-70B", 1, 1, 1, True),
]


def planner_argv(model: str, world: int, tp: int, pp: int, recompute: bool, method_flags: list) -> list:
    layers, hidden, ffn, heads, groups = LLAMA2[model]
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
            "--num-attention-heads", str(heads), "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0", "--bf16",
            "--use-flash-attn", "--micro-batch-size", "1", "--global-batch-size", str(8 * world // (tp * pp)),
            "--lr", "1e-4", "--train-iters", "10", "--mock-data", "--vocab-size", "32000",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--use-distributed-optimizer", "--transformer-impl", "local", "--load", "base", "--finetune",
            "--world-size", str(world), "--gpu", "A100"]
    if groups != heads:
        argv += ["--group-query-attention", "--num-query-groups", str(groups)]
    if tp > 1:
        argv.append("--sequence-parallel")
    if recompute:
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return argv + method_flags


def planner_table() -> str:
    from megatron.training.planner.plan import GIB, plan_from_argv

    rows = ["| model | GPUs (TP x PP x DP) | method | trainable | weights | grads | optimizer | activations | "
            "total / GPU (GiB) | fits 80 GB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for model, world, tp, pp, recompute in PLANS:
        for method, flags in METHODS.items():
            plan = plan_from_argv(planner_argv(model, world, tp, pp, recompute, flags))
            s = plan.peak_stage
            layout = f"{world} ({tp} x {pp} x {world // (tp * pp)}){', full recompute' if recompute else ''}"
            rows.append(f"| {model} | {layout} | {method} | {s.trainable / 1e6:,.1f}M | {s.weights / GIB:.1f} | "
                        f"{s.gradients / GIB:.2f} | {s.optimizer / GIB:.2f} | {s.activations / GIB:.1f} | "
                        f"**{s.total / GIB:.1f}** | {'yes' if plan.fits else 'no'} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- report

def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f}"


def report(size: str, results: dict, blocks: int, iters: int) -> str:
    import torch

    layers, hidden, ffn, heads, groups, seq, vocab, micro, global_batch = SIZES[size]
    full = results["full fine-tuning"]
    lines = [
        "# Full fine-tuning vs LoRA vs QLoRA (CPU, one process each)",
        "",
        f"Machine: {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, fp32.",
        f"Model: {layers} layers, hidden {hidden}, ffn {ffn}, {heads} heads / {groups} groups, vocab {vocab}, "
        f"seq {seq}; global batch {global_batch} ({micro} per micro-batch); Adam; the same random base and mock data "
        f"for every method; {blocks} timed blocks of {iters} iterations after one warm-up iteration (median).",
        "",
        "| method | trainable params | % of the model | weights + buffers (MiB) | grads (MiB) | optimizer (MiB) | "
        "training state (MiB) | peak RSS (MiB) | RSS rise (MiB) | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        state = r["weights"] + r["gradients"] + r["optimizer"]
        lines.append(
            f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / full['parameters']:.2f} | {_mib(r['weights'])} | "
            f"{_mib(r['gradients'])} | {_mib(r['optimizer'])} | {_mib(state)} | {r['rss_peak_mib']:,.0f} | "
            f"{r['rss_peak_mib'] - r['rss_start_mib']:,.0f} | {r['tokens_per_s']:,.0f} |")
    full_state = full["weights"] + full["gradients"] + full["optimizer"]
    lines += ["", "Ratios to full fine-tuning:", "",
              "| method | trainable | training state | RSS rise | tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        state = r["weights"] + r["gradients"] + r["optimizer"]
        rise = (r["rss_peak_mib"] - r["rss_start_mib"]) / max(full["rss_peak_mib"] - full["rss_start_mib"], 1e-9)
        lines.append(f"| {name} | {r['trainable'] / full['trainable']:.4f} | {state / full_state:.3f} | {rise:.3f} | "
                     f"{r['tokens_per_s'] / full['tokens_per_s']:.2f} |")
    lines += ["", "Per-block ms/iteration: " + "; ".join(
        f"{name}: {', '.join(f'{t:.0f}' for t in r['block_ms'])}" for name, r in results.items()), "",
        "## The planner for Llama-2 (bf16, seq 4096, micro-batch 1, distributed optimizer, A100 80 GB)", "",
        "From `tools/plan.py` with the same adapter flags (peak pipeline stage, GiB per GPU):", "",
        planner_table()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        worker_argv, blocks, iters = json.loads(opts.worker)
        print(json.dumps(measure(worker_argv, blocks, iters)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = run_methods(opts.size, os.path.join(tmp, "base"), opts.blocks, opts.iters)
    sys.path.insert(0, HERE)
    from bench_report import emit

    emit(report(opts.size, results, opts.blocks, opts.iters), opts.out)


if __name__ == "__main__":
    main()
