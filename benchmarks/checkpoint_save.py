"""How long a checkpoint save blocks the training loop, per-rank torch vs
torch_dist vs torch_dist --async-save, side by side in one run; and how long
it takes to continue under another layout: load the torch_dist checkpoint
directly, vs convert the torch checkpoint offline first and load that.

    python benchmarks/checkpoint_save.py [--out benchmarks/results/checkpoint_save_cpu.md]
    # tiny, to check it works:
    python benchmarks/checkpoint_save.py --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 \\
        --num-attention-heads 4 --num-query-groups 2 --vocab-size 256 --seq-length 32 --rounds 1

Phase 1 (torchrun, --nproc ranks, --save-layout): the driver builds the model
and optimizer and trains one iteration (so the Adam moments exist), saves
once in each format uncounted (the first save of a run starts processes),
then --rounds times in each format, the formats alternating so machine noise
hits all alike. "Blocked" is the save call on the training rank (the slowest rank);
"published" is until the tracker names the checkpoint (for synchronous saves
the same). Phase 2 (tools/checkpoint/util.py): the torch checkpoint is
converted offline to --load-layout. Phase 3 (torchrun, --load-layout): the
same driver set-up loads each candidate; the load call is timed.

Default model: Llama of about 1.0B parameters (hidden 2048, 20 layers, GQA
32 heads / 4 groups, FFN 5632, vocabulary 32000, untied), bf16 weights with
fp32 Adam state (16 bytes per parameter: ~16 GB over the ranks, plus ~2 GB
for the staging copy of a torch_dist save). --use-distributed-optimizer
also gathers its state for the layout-free format (3 x 4 bytes per
parameter more, per model-parallel rank): use it at smaller sizes here.
"""

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# report label: (--ckpt-format, --async-save)
MODES = {"torch": ("torch", False), "torch_dist": ("torch_dist", False),
         "torch_dist --async-save": ("torch_dist", True)}
LLAMA = ["--group-query-attention", "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--make-vocab-size-divisible-by", "128"]
RUN = ["--micro-batch-size", "1", "--lr", "1e-4", "--mock-data", "--log-interval", "1000000",
       "--eval-interval", "1000000", "--eval-iters", "0", "--train-iters", "1000"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    g = p.add_argument_group("model")
    for flag, default in (("--num-layers", 20), ("--hidden-size", 2048), ("--ffn-hidden-size", 5632),
                          ("--num-attention-heads", 32), ("--num-query-groups", 4), ("--vocab-size", 32000),
                          ("--seq-length", 64)):
        g.add_argument(flag, type=int, default=default)
    g.add_argument("--fp32", action="store_true", help="fp32 weights (default: bf16 weights, fp32 optimizer state)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) of both layouts")
    p.add_argument("--save-layout", default="--tensor-model-parallel-size 2", help="parallel flags of the saving run")
    p.add_argument("--load-layout", default="--pipeline-model-parallel-size 2",
                   help="parallel flags of the run that continues")
    p.add_argument("--rounds", type=int, default=3, help="saves per format")
    p.add_argument("--work-dir", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the markdown report here as well")
    p.add_argument("--phase", choices=["save", "load"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def driver_argv(args, layout: str) -> list:
    model = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-attention-heads", str(args.num_attention_heads),
             "--num-query-groups", str(args.num_query_groups), "--seq-length", str(args.seq_length),
             "--max-position-embeddings", str(args.seq_length), "--vocab-size", str(args.vocab_size)]
    extra = ([] if args.fp32 else ["--bf16"]) + (["--use-distributed-optimizer"] if args.use_distributed_optimizer
                                                 else [])
    return model + LLAMA + RUN + extra + layout.split()


def _slowest(seconds: float) -> float:
    import torch

    t = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def _disk_gib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2 ** 30


def phase_save(args, work: str) -> dict:
    """Blocked and published seconds of each format's saves (rank 0's dict)."""
    import torch

    from driver_harness import DriverHarness
    from megatron.training.checkpoint import save_load

    harness = DriverHarness(driver_argv(args, args.save_layout))
    run, state = harness.args, harness.state
    save_load.prepare_saves(argparse.Namespace(save=work, ckpt_format="torch_dist"))  # as pretrain() does
    harness.train_block(1)
    n_params = sum(p.numel() for chunk in harness.model for p in chunk.parameters())
    t = torch.tensor([n_params], dtype=torch.float64)
    torch.distributed.all_reduce(t)  # (over-counts replicated copies under DP; the layouts here have DP=1)
    times = {mode: {"blocked": [], "published": []} for mode in MODES}
    sizes, first_seconds = {}, {}
    for r in range(-1, args.rounds):  # round -1 warms up, uncounted: the first save of each kind starts
        for mode, (fmt, asynchronous) in MODES.items():  # processes (megatron-core's result queue, writers)
            run.ckpt_format, run.async_save = fmt, asynchronous
            run.save = os.path.join(work, f"{fmt}{'_async' if asynchronous else ''}_{r}")
            torch.distributed.barrier()
            start = time.perf_counter()
            save_load.save_checkpoint(run, state.iteration, harness.model, harness.optimizer, harness.scheduler,
                                          state.consumed_train_samples)
            blocked = time.perf_counter() - start
            save_load.finalize_async_saves(run, blocking=True)
            published = time.perf_counter() - start
            blocked, published = _slowest(blocked), _slowest(published)
            if r < 0:
                first_seconds[mode] = blocked
            else:
                times[mode]["blocked"].append(blocked)
                times[mode]["published"].append(published)
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                sizes[mode] = _disk_gib(run.save)
                keep = r == args.rounds - 1 and not asynchronous
                if keep:
                    os.replace(run.save, os.path.join(work, f"saved_{fmt}"))
                else:
                    shutil.rmtree(run.save)
            torch.distributed.barrier()
    return {"times": times, "first": first_seconds, "sizes": sizes, "parameters": int(t.item())}


def phase_load(args, work: str) -> dict:
    """Seconds of each load under --load-layout (rank 0's dict)."""
    import torch
    from megatron.core import parallel_state

    from driver_harness import DriverHarness
    from megatron.training.checkpoint import save_load

    candidates = {
        "torch_dist, loaded directly (model + optimizer state)": ("saved_torch_dist", []),
        "torch, resharded while loading (weights only, --finetune)": ("saved_torch", ["--finetune"]),
        "torch, converted offline, then loaded (weights only)": ("converted", ["--no-load-optim", "--no-load-rng"]),
    }
    out = {}
    for label, (name, flags) in candidates.items():
        parallel_state.destroy_model_parallel()  # the set-up below lays out its own
        harness = DriverHarness(driver_argv(args, args.load_layout) + ["--load", os.path.join(work, name)] + flags)
        torch.distributed.barrier()
        start = time.perf_counter()
        save_load.load_checkpoint(harness.args, harness.model, harness.optimizer, harness.scheduler)
        out[label] = _slowest(time.perf_counter() - start)
        del harness
        gc.collect()
    return out


def worker(args) -> None:
    """One rank of a torchrun phase; rank 0 writes the phase's result."""
    import torch

    work = args.work_dir
    result = phase_save(args, work) if args.phase == "save" else phase_load(args, work)
    if torch.distributed.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)


def _torchrun(args, phase: str, work: str) -> dict:
    result = os.path.join(work, f"{phase}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.abspath(__file__), *sys.argv[1:], "--work-dir", work, "--phase", phase, "--result", result]
    subprocess.run(command, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(result) as f:
        return json.load(f)


def _convert_offline(args, work: str) -> float:
    from megatron.training.arguments import build_parser as driver_parser

    layout = driver_parser().parse_known_args(args.load_layout.split())[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "util.py"), "--model-type", "GPT",
                    "--load-dir", os.path.join(work, "saved_torch"), "--save-dir", os.path.join(work, "converted"),
                    "--target-tensor-parallel-size", str(layout.tensor_model_parallel_size),
                    "--target-pipeline-parallel-size", str(layout.pipeline_model_parallel_size)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def report(args, saved: dict, convert_s: float, loads: dict) -> str:
    med = statistics.median
    lines = [
        "# Checkpoint saves and loads on CPU (torch vs torch_dist vs torch_dist --async-save)", "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), Python {platform.python_version()}. "
        f"Command: `python benchmarks/checkpoint_save.py {' '.join(sys.argv[1:])}`.", "",
        f"Model: Llama, {_count(saved['parameters'])} parameters ({args.num_layers} layers, hidden "
        f"{args.hidden_size}, FFN {args.ffn_hidden_size}, {args.num_attention_heads} heads / "
        f"{args.num_query_groups} groups, vocabulary {args.vocab_size}), {'fp32' if args.fp32 else 'bf16'} weights, "
        f"Adam ({'distributed' if args.use_distributed_optimizer else 'plain'} optimizer); "
        f"{args.nproc} ranks, saved with `{args.save_layout}`, continued with `{args.load_layout}`.", "",
        f"## Saving (median of {args.rounds} rounds per format, the slowest rank)", "",
        "| format | training blocked s | until published s | on disk MiB | first save of the run: blocked s |",
        "|---|---|---|---|---|"]
    for mode, t in saved["times"].items():
        lines.append(f"| {mode} | {med(t['blocked']):.2f} | {med(t['published']):.2f} | "
                     f"{saved['sizes'][mode] * 1024:,.1f} | {saved['first'][mode]:.2f} |")
    lines += ["", "The first save of a run is counted apart (code paths and the writers' first fork warm up); "
              "megatron-core's result-queue process is started at set-up, as the driver does, outside these times."]
    lines += ["", "## Continuing under the other layout", "", "| how | s |", "|---|---|"]
    for label, seconds in loads.items():
        if label.startswith("torch, converted"):
            lines.append(f"| {label} | {convert_s + seconds:.2f} (conversion {convert_s:.2f} + load {seconds:.2f}) |")
        else:
            lines.append(f"| {label} | {seconds:.2f} |")
    lines += ["", "Only torch_dist carries the optimizer state to the other layout; the torch rows restart Adam.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase:
        worker(args)
        return 0
    from bench_report import emit

    work = args.work_dir or os.path.join(ROOT, "benchmarks", ".checkpoint_save_work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        saved = _torchrun(args, "save", work)
        convert_s = _convert_offline(args, work)
        loads = _torchrun(args, "load", work)
        emit(report(args, saved, convert_s, loads), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
