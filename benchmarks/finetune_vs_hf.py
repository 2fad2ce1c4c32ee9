"""One fine-tuning step of our driver against transformers (+ peft), side by side, on CPU.

    python benchmarks/finetune_vs_hf.py [--seq 256 1024] [--rounds 7] [--warmup 2] \\
        [--out benchmarks/results/finetune_vs_hf_cpu.md]

The model is SmolLM2-135M's configuration typed in (hidden 576, 30 layers, 9
heads / 3 key-value heads, intermediate 1536, vocabulary 49152, tied
embeddings, RoPE theta 100000, RMSNorm eps 1e-5, 8192 positions) with random
weights: nothing is downloaded. fp32, micro-batch 4, no dropout, AdamW with
weight decay 0.01, gradient clipping at 1.0; full fine-tuning and LoRA r=8
(alpha 16, all seven linear modules of every layer).

Each method runs in its own process (so each peak RSS is its own): ours is
the driver's own loop (`training.train`, one iteration per call, through
benchmarks/driver_harness.py: forward/backward schedule, DDP grad buffers,
megatron-core's optimizer, gradient clipping, LR schedule; LoRA from a random
base checkpoint, --load --finetune); the reference is the inner step of
transformers' Trainer with its defaults written out: LlamaForCausalLM (SDPA
attention, use_cache off) (+ peft's get_peft_model), loss.backward(),
clip_grad_norm_(1.0), AdamW(fused=True) -- Trainer's default optimizer on
torch >= 2.8 --, zero_grad(set_to_none=True). Both read random token ids.

The processes of one sequence length run together and take turns, one step
each, in a rotating order, so that a noisy neighbour slows all of them
alike; the first `--warmup` steps of each are not timed. From
`--pairs-from` tokens on (default 1024: four processes' memory does not fit
24 GB there), the full fine-tuning pair and then the LoRA pair take turns
instead, so ours and its reference always alternate, and our LoRA against
our full step compares two consecutive phases. Reported: the
median step time, tokens/s, our tokens/s over the reference's (also the
range of the per-round ratios), our LoRA step over our full step, and the
peak RSS (VmHWM) of each process. The machine's load (`/proc/loadavg`) is
recorded before and after.
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

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), typed in.
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192)
MICRO_BATCH = 4
LORA_RANK, LORA_ALPHA = 8, 16
WORKERS = ("ours full", "transformers full", "ours LoRA", "transformers + peft LoRA")


def driver_flags(seq: int) -> list:
    c = SMOLLM2_135M
    return [
        "--num-layers", str(c["num_hidden_layers"]), "--hidden-size", str(c["hidden_size"]),
        "--ffn-hidden-size", str(c["intermediate_size"]), "--num-attention-heads", str(c["num_attention_heads"]),
        "--group-query-attention", "--num-query-groups", str(c["num_key_value_heads"]),
        "--seq-length", str(seq), "--max-position-embeddings", str(c["max_position_embeddings"]),
        "--normalization", "RMSNorm", "--norm-epsilon", str(c["rms_norm_eps"]), "--swiglu",
        "--use-rotary-position-embeddings", "--rotary-base", str(int(c["rope_theta"])), "--disable-bias-linear",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--mock-data", "--vocab-size", str(c["vocab_size"]),
        "--make-vocab-size-divisible-by", "128", "--micro-batch-size", str(MICRO_BATCH),
        "--global-batch-size", str(MICRO_BATCH), "--lr", "1e-4", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--log-interval", "1000000", "--eval-interval", "1000000", "--eval-iters", "0", "--seed", "1234",
        "--train-iters", "1000000",
    ]


def lora_flags(base: str) -> list:
    return ["--load", base, "--finetune", "--lora-rank", str(LORA_RANK), "--lora-alpha", str(LORA_ALPHA),
            "--lora-dropout", "0", "--lora-target-modules", "all-linear"]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------- the two steps (in worker processes)

def ours(seq: int, lora: bool, base: str):
    """(one driver iteration, trainable parameters)."""
    sys.path.insert(0, HERE)
    from driver_harness import DriverHarness

    harness = DriverHarness(driver_flags(seq) + (lora_flags(base) if lora else []))
    trainable = sum(p.numel() for chunk in harness.model for p in chunk.parameters() if p.requires_grad)
    return (lambda: harness.train_block(1)), trainable, harness.args.kernel_selection.describe()


def reference(seq: int, lora: bool):
    """(one step of the Trainer's inner loop, trainable parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(**SMOLLM2_135M, attention_dropout=0.0, use_cache=False)
    model = LlamaForCausalLM(config)  # transformers' default attention: SDPA
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(1234)

    def step():
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (MICRO_BATCH, seq), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params), f"attention: {model.config._attn_implementation}"


def worker(spec: dict) -> None:
    """Build one method, then run a step per line read from stdin ('step'), reporting
    its wall and CPU seconds; 'done' reports the totals as the last JSON line."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    lora = "LoRA" in spec["name"]
    rss_start = _status_mib("VmRSS")
    if spec["name"].startswith("ours"):
        step, trainable, note = ours(spec["seq"], lora, spec["base"])
    else:
        step, trainable, note = reference(spec["seq"], lora)
    print(json.dumps({"ready": True}), flush=True)
    walls, cpus = [], []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        print(json.dumps({"wall": walls[-1]}), flush=True)
    print(json.dumps({"walls": walls, "cpus": cpus, "trainable": trainable, "note": note,
                      "threads": torch.get_num_threads(), "rss_start_mib": rss_start,
                      "rss_peak_mib": _status_mib("VmHWM")}), flush=True)


# ---------------------------------------------------------------- the coordinator

class Worker:
    def __init__(self, name: str, seq: int, base: str, threads=None):
        spec = json.dumps({"name": name, "seq": seq, "base": base, "threads": threads})
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", spec], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=ROOT)

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stderr.seek(0)
                raise RuntimeError(f"{self.name}: the worker exited (rc {self.proc.wait()}):\n"
                                   + self.stderr.read()[-3000:])
            if line.startswith("{"):
                return json.loads(line)

    def wait_ready(self) -> None:
        self._reply()

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._reply()["wall"]

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        out = self._reply()
        self.proc.wait()
        return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_sequence(seq: int, base: str, rounds: int, warmup: int, names=WORKERS, threads=None) -> dict:
    """Start the workers for `seq` one after another (each ready before the next starts, so that
    building one does not slow another's steps), then `warmup + rounds` rounds of one step each."""
    workers = []
    try:
        for name in names:
            workers.append(Worker(name, seq, base, threads))
            workers[-1].wait_ready()
        for r in range(warmup + rounds):
            k = r % len(workers)
            for w in workers[k:] + workers[:k]:  # rotate who goes first
                w.step()
        return {w.name: w.finish() for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()


def write_base(base: str) -> None:
    """A random base checkpoint for the LoRA runs (the driver's --load --finetune)."""
    subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *driver_flags(256), "--train-iters", "0",
                    "--save", base, "--ckpt-format", "torch"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- report

def timed(r: dict, warmup: int) -> list:
    return r["walls"][warmup:]


def summary(results: dict, seq: int, warmup: int) -> dict:
    tokens = MICRO_BATCH * seq
    out = {}
    for name, r in results.items():
        walls = timed(r, warmup)
        out[name] = {"median_s": statistics.median(walls), "tokens_per_s": tokens / statistics.median(walls),
                     "cpu_s": statistics.median(r["cpus"][warmup:])}
    return out


def round_ratios(results: dict, a: str, b: str, warmup: int) -> list:
    """Per round, b's step time over a's (a's speed relative to b's)."""
    return [tb / ta for ta, tb in zip(timed(results[a], warmup), timed(results[b], warmup))]


PAIRS = (("full fine-tuning", "ours full", "transformers full"),
         ("LoRA r=8, all-linear", "ours LoRA", "transformers + peft LoRA"))


def report(runs: dict, rounds: int, warmup: int, loads: list, command: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import transformers

    any_run = next(iter(next(iter(runs.values())).values()))
    lines = [
        "# One fine-tuning step: our driver vs transformers (+ peft), CPU", "",
        f"Machine: {platform.node()} ({cpu}, {os.cpu_count()} cores), torch {torch.__version__} "
        f"({any_run['threads']} threads per process), transformers {transformers.__version__}, peft {peft.__version__}, "
        f"fp32. Command: `{command}`.",
        "",
        "Model: SmolLM2-135M's configuration with random weights (30 layers, hidden 576, 9 heads / 3 KV heads, "
        "intermediate 1536, vocabulary 49152, tied embeddings); micro-batch 4; AdamW, clipping at 1.0, no dropout. "
        f"Median of {rounds} steps per process after {warmup} warm-up steps; the processes of one sequence length "
        "(or, at the longer ones, of one method) take turns step by step. Ratios above 1 mean ours is faster: "
        "tokens/s from the median wall time; the per-round range from each round's pair of steps; 'by CPU time' "
        "from the median process CPU seconds per step (all threads; less sensitive to other jobs taking the "
        "cores, though threads that spin while waiting count).",
        "",
        "| seq | method | ours tokens/s | reference tokens/s | ours / reference | per-round range | by CPU time "
        "| ours peak RSS MiB | reference peak RSS MiB |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for seq, results in runs.items():
        s = summary(results, seq, warmup)
        for title, a, b in PAIRS:
            ratios = round_ratios(results, a, b, warmup)
            lines.append(
                f"| {seq} | {title} | {s[a]['tokens_per_s']:,.0f} | {s[b]['tokens_per_s']:,.0f} | "
                f"**{s[a]['tokens_per_s'] / s[b]['tokens_per_s']:.2f}x** | {min(ratios):.2f}-{max(ratios):.2f} | "
                f"{s[b]['cpu_s'] / s[a]['cpu_s']:.2f}x | "
                f"{results[a]['rss_peak_mib']:,.0f} | {results[b]['rss_peak_mib']:,.0f} |")
    lines += ["", "LoRA against full fine-tuning in each implementation (step time of full / step time of LoRA; "
              "where the methods ran in pairs, from two consecutive phases):",
              "", "| seq | ours | reference | trainable (ours / reference) |", "|---:|---:|---:|---|"]
    for seq, results in runs.items():
        s = summary(results, seq, warmup)
        lines.append(
            f"| {seq} | {s['ours full']['median_s'] / s['ours LoRA']['median_s']:.2f}x | "
            f"{s['transformers full']['median_s'] / s['transformers + peft LoRA']['median_s']:.2f}x | "
            f"LoRA {results['ours LoRA']['trainable']:,} / {results['transformers + peft LoRA']['trainable']:,}; "
            f"full {results['ours full']['trainable']:,} / {results['transformers full']['trainable']:,} |")
    lines += ["", "Per-step seconds (timed steps), and median process CPU seconds per step:", ""]
    for seq, results in runs.items():
        s = summary(results, seq, warmup)
        for name, r in results.items():
            lines.append(f"- seq {seq}, {name}: {', '.join(f'{t:.2f}' for t in timed(r, warmup))}; "
                         f"CPU {s[name]['cpu_s']:.2f} s")
    notes = {name: r["note"] for name, r in next(iter(runs.values())).items()}
    lines += ["", f"Our kernels: {notes['ours full']}. Reference: {notes['transformers full']}.", "",
              f"Load average (1, 5, 15 min) before: {loads[0]}; after: {loads[-1]}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs-from", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        worker(json.loads(opts.worker))
        return
    loads = [loadavg()]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        write_base(base)
        for seq in opts.seq:
            groups = [WORKERS] if seq < opts.pairs_from else [WORKERS[:2], WORKERS[2:]]
            runs[seq] = {}
            for names in groups:
                runs[seq].update(run_sequence(seq, base, opts.rounds, opts.warmup, names, opts.threads))
            loads.append(loadavg())
    sys.path.insert(0, HERE)
    from bench_report import emit

    command = "python benchmarks/finetune_vs_hf.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(report(runs, opts.rounds, opts.warmup, loads, command.strip()), opts.out)


if __name__ == "__main__":
    main()
