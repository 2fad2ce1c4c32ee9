"""The planner's activation memory against torch.cuda.max_memory_allocated on
one GPU (needs CUDA; run inside the Dockerfile.ngc image for the Transformer
Engine path, or with a pip CUDA torch for the local + SDPA path).

    python benchmarks/activation_memory_gpu.py --out benchmarks/results/activation_memory_gpu.md

Each configuration trains a 4-layer Llama of Llama-2-7B's width (GQA 8,
SwiGLU, bf16, mock data) for 3 iterations with the real driver in a fresh
process. Around the forward/backward pass of iterations 2 and 3 (the optimizer
state exists by then) it records memory_allocated before and
max_memory_allocated during; measured activations = peak - before. That peak
includes transients the plan leaves to its headroom (bf16 logits beside their
fp32 copy, attention workspaces), so the table shows the difference rather
than asserting a bound.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = [
    "--num-layers", "4", "--hidden-size", "4096", "--ffn-hidden-size", "11008", "--num-attention-heads", "32",
    "--group-query-attention", "--num-query-groups", "8", "--normalization", "RMSNorm", "--swiglu",
    "--use-rotary-position-embeddings", "--no-position-embedding", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--bf16", "--accumulate-allreduce-grads-in-fp32", "--use-distributed-optimizer",
    "--mock-data", "--vocab-size", "32000", "--lr", "1e-4", "--train-iters", "3", "--log-interval", "1",
    "--eval-iters", "0", "--eval-interval", "1000",
]
CONFIGS = {
    "flash, seq 4096, mbs 1": ["--use-flash-attn", "--seq-length", "4096", "--micro-batch-size", "1"],
    "flash, seq 4096, mbs 2": ["--use-flash-attn", "--seq-length", "4096", "--micro-batch-size", "2"],
    "flash, seq 8192, mbs 1": ["--use-flash-attn", "--seq-length", "8192", "--micro-batch-size", "1"],
    "flash, full recompute": ["--use-flash-attn", "--seq-length", "4096", "--micro-batch-size", "2",
                              "--recompute-granularity", "full", "--recompute-method", "uniform",
                              "--recompute-num-layers", "1"],
    "unfused attention, seq 2048": ["--transformer-impl", "local", "--seq-length", "2048", "--micro-batch-size", "1"],
}


def measure(argv) -> dict:
    """Train in this process; return the activation peaks of iterations 2 and 3 (bytes)."""
    import torch
    from megatron.core import pipeline_parallel

    import pretrain_gpt
    from megatron.training.initialize import destroy
    from megatron.training.models.llama import attention_backend_name

    peaks, original = [], pipeline_parallel.get_forward_backward_func

    def measured_forward_backward():
        inner = original()

        def run(**kwargs):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = inner(**kwargs)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
            return out

        return run

    pipeline_parallel.get_forward_backward_func = measured_forward_backward
    captured = {}
    from megatron.training import training

    original_setup = training.setup_args

    def setup_and_record(*a, **k):
        args = original_setup(*a, **k)
        captured["attention"] = attention_backend_name(args)
        return args

    training.setup_args = setup_and_record
    try:
        pretrain_gpt.main(list(argv))
    finally:
        pipeline_parallel.get_forward_backward_func = original
        training.setup_args = original_setup
        destroy()
    return {"peaks": peaks[1:], "attention": captured.get("attention", "?"), "device": torch.cuda.get_device_name()}


def planned(argv) -> float:
    from megatron.training.planner.plan import plan_from_argv

    return plan_from_argv(list(argv) + ["--world-size", "1"]).stages[0].activations


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one configuration
    args = parser.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(measure(MODEL + CONFIGS[args.one])), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares with torch.cuda.max_memory_allocated; run it on a GPU")
    rows = ["| configuration | attention | planned GiB | measured peak GiB (it 2, 3) | measured / planned |",
            "|---|---|---:|---:|---:|"]
    device = "?"
    for name, flags in CONFIGS.items():
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name], capture_output=True,
                             text=True, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append(f"| {name} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}"
                        " | | | |")
            continue
        result = json.loads(line[len("RESULT "):])
        device = result["device"]
        plan = planned(MODEL + flags)
        peak = max(result["peaks"])
        rows.append(f"| {name} | {result['attention']} | {plan / 2**30:.2f} | "
                    f"{', '.join(f'{p / 2**30:.2f}' for p in result['peaks'])} | {peak / plan:.2f} |")
    text = (f"Planned activation memory vs torch.cuda.max_memory_allocated, one {device}, "
            f"torch {torch.__version__}; model: {' '.join(MODEL[:12])} ...\n\n" + "\n".join(rows) + "\n")
    from bench_report import emit

    emit(text, args.out)


if __name__ == "__main__":
    main()
