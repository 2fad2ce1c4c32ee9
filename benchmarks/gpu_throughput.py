"""Training throughput of the driver on one GPU: tokens/s, TFLOP/s (the driver's
model-FLOPs count) and MFU against the GPU's dense bf16 peak, with this
repo's fused kernels on and off, and beside Megatron-LM's own pretrain_gpt.py.

    python benchmarks/gpu_throughput.py --config 1b --kernels on off --compare-megatron-lm .whl/Megatron-LM \
        --out benchmarks/results/gpu_throughput_H200.md
    python benchmarks/gpu_throughput.py --config largest --kernels on off      # the largest preset that fits
    python benchmarks/gpu_throughput.py --config tiny --kernels on off --warmup 1 --iters 2   # smoke run, also on CPU

Each run trains on mock data through the driver's own loop (bf16 on GPU, the
distributed optimizer, --use-flash-attn), in a fresh process, for warm-up +
timed iterations; only the timed ones count. One more iteration then runs
under torch.profiler, which names the SDPA backend that ran (cuDNN,
FlashAttention, memory-efficient or math) and the kernels that took the most
time. `--kernels off` adds the flags that turn this repo's kernels off
(KERNELS_OFF); the start-up line of each run ("kernels: ...") is in the report.

`largest` is the preset with the most parameters that the planner
(megatron/training/planner/plan.py) fits in this GPU's memory.

`--compare-megatron-lm PATH` runs PATH/pretrain_gpt.py (Megatron-LM
core_v0.16.1, its megatron/training beside it) under torchrun with the same
model, batch, precision and optimizer flags and the local layer spec, plus
what a pip install without Transformer Engine or apex requires of it (no
RoPE, masked-softmax or gradient-accumulation fusion) and its fused
cross-entropy, and prints the ratio of tokens/s. Without megatron/core in
PATH the pip megatron-core 0.16.1 (the same release) is used.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--use-flash-attn", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--group-query-attention"]

# The flags that turn this repo's kernels off (megatron-core's own fusions keep their defaults).
KERNELS_OFF = ["--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-cross-entropy-loss-fusion",
               "--no-gradient-accumulation-fusion", "--no-fused-adam"]

_FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]

# name -> (flags, micro batch, global batch)
CONFIGS = {
    "tiny": (["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "352", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--seq-length", "128", "--max-position-embeddings", "128",
              "--vocab-size", "1024"], 2, 4),
    # ~1.5B (Llama-3.2-1B-like, untied embeddings), sequence 4096.
    "1b": (["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192", "--num-attention-heads", "32",
            "--num-query-groups", "8", "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--vocab-size", "128256", "--rotary-base", "500000"], 2, 16),
    # ~3.6B (Llama-3.2-3B-like), sequence 4096, full recomputation: fits an 80 GB GPU.
    "3b": (["--num-layers", "28", "--hidden-size", "3072", "--ffn-hidden-size", "8192", "--num-attention-heads", "24",
            "--num-query-groups", "8", "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--vocab-size", "128256", "--rotary-base", "500000"] + _FULL_RECOMPUTE, 1, 16),
    # ~5.9B Llama-2-7B shape with GQA, sequence 4096, selective recomputation: fits a 141 GB GPU.
    "7b": (["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "11008", "--num-attention-heads", "32",
            "--num-query-groups", "8", "--seq-length", "4096", "--max-position-embeddings", "4096",
            "--vocab-size", "32000", "--recompute-activations"], 1, 8),
}
LARGEST_FIRST = ("7b", "3b", "1b")

# torch's SDPA backends, by the aten operator each one runs.
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_flash_attention": "FlashAttention-2",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_attention_math": "math (unfused)",
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


def driver_argv(config: str, iterations: int, kernels: str) -> list:
    import torch

    flags, mbs, gbs = CONFIGS[config]
    precision = ["--bf16", "--use-distributed-optimizer"] if torch.cuda.is_available() else []
    return LLAMA + flags + precision + (KERNELS_OFF if kernels == "off" else []) + [
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-4", "--mock-data",
        "--train-iters", str(iterations), "--log-interval", "1000000", "--eval-iters", "0",
        "--eval-interval", "1000000"]


def largest_config(memory_gib: float) -> str:
    """The preset with the most parameters that the planner fits in `memory_gib`."""
    from megatron.training.planner.plan import plan_from_argv

    for name in LARGEST_FIRST:
        flags, mbs, gbs = CONFIGS[name]
        argv = LLAMA + flags + ["--bf16", "--use-distributed-optimizer", "--micro-batch-size", str(mbs),
                                "--global-batch-size", str(gbs), "--lr", "1e-4", "--mock-data", "--train-iters", "1",
                                "--world-size", "1", "--gpu-memory-gib", str(memory_gib)]
        if plan_from_argv(argv).fits:
            return name
    return LARGEST_FIRST[-1]


def profile_summary(prof, cuda: bool, top: int = 8) -> dict:
    """The SDPA backend(s) that ran and the operators that took the most time in one iteration."""
    events = prof.key_averages()
    backends = sorted({SDPA_BACKENDS[e.key] for e in events if e.key in SDPA_BACKENDS})
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    heaviest = sorted((e for e in events if getattr(e, attr, 0) > 0), key=lambda e: -getattr(e, attr))[:top]
    return {"sdpa": backends or ["none"], "top": [(e.key[:90], getattr(e, attr) / 1e3) for e in heaviest]}


def run(config: str, warmup: int, iters: int, kernels: str = "on") -> dict:
    """Train `config` in this process (after `warmup` iterations, `iters` timed ones, then one profiled)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from driver_harness import DriverHarness
    from megatron.training.flops import ModelShape, flops_per_iteration, throughput
    from megatron.training.models.llama import attention_backend_name

    cuda = torch.cuda.is_available()
    harness = DriverHarness(driver_argv(config, warmup + iters + 1, kernels))
    args, model = harness.args, harness.model

    def block(n):
        harness.train_block(n)
        if cuda:
            torch.cuda.synchronize()

    block(warmup)
    t0 = time.perf_counter()
    block(iters)
    seconds = (time.perf_counter() - t0) / iters
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        block(1)
    flops = flops_per_iteration(ModelShape.from_args(args), args.global_batch_size, args.seq_length)
    # the training log's figures (flops.throughput) for the one GPU this benchmark runs on
    tput = throughput(flops, seconds, args.global_batch_size * args.seq_length, world_size=1)
    name = gpu_name()
    peak = peak_tflops(name)
    return {
        "config": config, "kernels": kernels, "gpu": name, "attention": attention_backend_name(args),
        "kernel_paths": args.kernel_selection.describe(),
        "params_b": sum(p.numel() for c in model for p in c.parameters()) / 1e9,
        "ms_per_iteration": seconds * 1e3, "tokens_per_s": tput.tokens_per_second_per_gpu,
        "tflops": tput.tflops_per_gpu, "mfu": tput.tflops_per_gpu / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "profile": profile_summary(prof, cuda),
    }


# ---------------------------------------------------------------- Megatron-LM side by side

def megatron_lm_argv(config: str, iterations: int) -> list:
    """Megatron-LM's flags for the same model, batch, precision and optimizer, local spec."""
    flags, mbs, gbs = CONFIGS[config]
    ours = {"--use-rotary-position-embeddings", "--use-flash-attn"}
    model = [f for f in LLAMA if f not in ours]
    shape = []
    it = iter(flags)
    for flag in it:
        if flag == "--vocab-size":
            # Megatron-LM's NullTokenizer adds an end-of-document id to --vocab-size.
            shape += ["--vocab-size", str(int(next(it)) - 1)]
        else:
            shape.append(flag)
    return model + shape + [
        "--position-embedding-type", "rope", "--transformer-impl", "local", "--tokenizer-type", "NullTokenizer",
        "--bf16", "--use-distributed-optimizer", "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
        "--lr", "1e-4", "--mock-data", "--train-iters", str(iterations), "--log-interval", "1", "--log-throughput",
        "--eval-iters", "0", "--eval-interval", "1000000",
        # What a pip install without Transformer Engine or apex needs: these fusions need their libraries.
        "--no-rope-fusion", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
        # Its fastest cross-entropy without Transformer Engine (opt-in in Megatron-LM).
        "--cross-entropy-loss-fusion",
    ]


_ITERATION_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def parse_megatron_lm_log(text: str, warmup: int) -> float:
    """Mean ms per iteration over the iterations after `warmup`, from Megatron-LM's log lines."""
    times = [float(ms) for it, ms in _ITERATION_MS.findall(text) if int(it) > warmup]
    if not times:
        raise RuntimeError("no Megatron-LM iteration line after the warm-up in its output")
    return sum(times) / len(times)


def run_megatron_lm(path: str, config: str, warmup: int, iters: int, log_path=None) -> dict:
    from megatron.training.sizes import padded_vocab_size
    from megatron.training.flops import ModelShape, flops_per_iteration

    path = os.path.abspath(path)
    script = os.path.join(path, "pretrain_gpt.py")
    if not os.path.isfile(script):
        raise SystemExit(f"--compare-megatron-lm {path}: no pretrain_gpt.py there: "
                         "give a Megatron-LM core_v0.16.1 tree")
    argv = megatron_lm_argv(config, warmup + iters)
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_lm_launch.py")
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          launcher, path] + argv, capture_output=True, text=True, env=env, cwd=path)
    if log_path:
        from megatron.training.fileio import atomic_write_text

        atomic_write_text(log_path, out.stdout + out.stderr)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"Megatron-LM exited with {out.returncode}: {' | '.join(tail)}")
    ms = parse_megatron_lm_log(out.stdout + out.stderr, warmup)
    flags, mbs, gbs = CONFIGS[config]
    value = lambda flag: int(flags[flags.index(flag) + 1])  # noqa: E731
    shape = ModelShape(value("--num-layers"), value("--hidden-size"), value("--ffn-hidden-size"),
                       value("--num-attention-heads"), value("--num-query-groups"),
                       value("--hidden-size") // value("--num-attention-heads"),
                       padded_vocab_size(value("--vocab-size"), 128, 1), True)
    seq = value("--seq-length")
    tflops = flops_per_iteration(shape, gbs, seq) / (ms / 1e3) / 1e12
    peak = peak_tflops(gpu_name())
    return {"config": config, "kernels": "Megatron-LM", "ms_per_iteration": ms, "tokens_per_s": gbs * seq / (ms / 1e3),
            "tflops": tflops, "mfu": tflops / peak if peak else None, "argv": " ".join(argv)}


# ---------------------------------------------------------------- report

def _child(config: str, warmup: int, iters: int, kernels: str) -> dict:
    """One run in a fresh process (its own CUDA context, process group and kernel call sites)."""
    spec = json.dumps({"config": config, "warmup": warmup, "iters": iters, "kernels": kernels})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", spec], capture_output=True, text=True,
                         cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"config": config, "kernels": kernels, "error": " | ".join(tail) or f"exit {out.returncode}"}
    return json.loads(line[len("RESULT "):])


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | {r['kernels']} | failed: {r['error']} | | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") is not None else "n/a"
    params = f"{r['params_b']:.2f}" if "params_b" in r else ""
    return (f"| {r['config']} | {r['kernels']} | {params} | {r['ms_per_iteration']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['tflops']:.1f} | {mfu} | {mem} |")


def report(results: list, warmup: int, iters: int) -> str:
    import megatron.core
    import torch

    ok = [r for r in results if "error" not in r and "params_b" in r]
    lines = [f"# Training throughput on {ok[0]['gpu'] if ok else gpu_name()}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, megatron-core "
             f"{megatron.core.__version__}; {warmup} warm-up + {iters} timed iterations; tokens/s and TFLOP/s by "
             "the driver's model-FLOPs count (megatron/training/flops.py).", "",
             "| config | kernels | params (B) | ms/iter | tokens/s/GPU | TFLOP/s/GPU | MFU | max memory (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(r) for r in results]
    by = {(r["config"], r["kernels"]): r for r in results if "error" not in r}
    for config in dict.fromkeys(r["config"] for r in results):
        on, off, mlm = by.get((config, "on")), by.get((config, "off")), by.get((config, "Megatron-LM"))
        if on and off:
            same = " (the same paths ran: no kernel device here, so the ratio is noise)" \
                if on["kernel_paths"] == off["kernel_paths"] else ""
            ratio = on["tokens_per_s"] / off["tokens_per_s"]
            lines.append(f"\n{config}: kernels on / off = {ratio:.3f}x tokens/s{same}")
        if on and mlm:
            lines.append(f"{config}: ours (kernels on) / Megatron-LM = {on['tokens_per_s'] / mlm['tokens_per_s']:.3f}x "
                         f"tokens/s\nMegatron-LM flags: `{mlm['argv']}`")
    for r in ok:
        lines += ["", f"## {r['config']}, kernels {r['kernels']}", "",
                  f"attention: {r['attention']}; SDPA backend (profiler): {', '.join(r['profile']['sdpa'])}",
                  f"kernels: {r['kernel_paths']}", "", "| operator (one iteration, profiler) | self ms |", "|---|---:|"]
        lines += [f"| `{name}` | {ms:.2f} |" for name, ms in r["profile"]["top"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS) + ["largest"], default="1b")
    parser.add_argument("--kernels", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compare-megatron-lm", metavar="PATH", default=None,
                        help="a Megatron-LM core_v0.16.1 tree: run its pretrain_gpt.py side by side")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one run
    opts = parser.parse_args()
    if opts.one is not None:
        spec = json.loads(opts.one)
        print("RESULT " + json.dumps(run(spec["config"], spec["warmup"], spec["iters"], spec["kernels"])), flush=True)
        return

    import torch

    config = opts.config
    if config == "largest":
        if not torch.cuda.is_available():
            sys.exit("--config largest sizes the model to this GPU's memory: run it on a GPU")
        config = largest_config(torch.cuda.get_device_properties(0).total_memory / 2 ** 30)
        print(f"largest preset that fits: {config}", flush=True)
    if opts.compare_megatron_lm and not torch.cuda.is_available():
        sys.exit("--compare-megatron-lm runs Megatron-LM, which needs CUDA: run it on a GPU")
    from bench_report import emit
    from megatron.training.fileio import atomic_write_text

    results = []
    for kernels in opts.kernels:
        results.append(_child(config, opts.warmup, opts.iters, kernels))
        if opts.out:  # what is done so far survives a time limit
            atomic_write_text(opts.out, report(results, opts.warmup, opts.iters))
    if opts.compare_megatron_lm:
        log = os.path.splitext(opts.out)[0] + "_megatron_lm.log" if opts.out else None
        try:
            results.append(run_megatron_lm(opts.compare_megatron_lm, config, opts.warmup, opts.iters, log))
        except RuntimeError as e:
            results.append({"config": config, "kernels": "Megatron-LM", "error": str(e)})
    emit(report(results, opts.warmup, opts.iters), opts.out)


if __name__ == "__main__":
    main()
