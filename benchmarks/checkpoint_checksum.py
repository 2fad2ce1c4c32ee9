"""What --ckpt-checksum costs on save and on load, in both checkpoint formats.

    python benchmarks/checkpoint_checksum.py --size-mb 1024 --out benchmarks/results/checkpoint_checksum_cpu.md

One state of `--size-mb` MB of fp32 tensors (a model's weights plus Adam's
two moments, in tensors of 16 MB), saved and loaded with the driver's own
code, without and with checksums, all side by side in one run: the kinds of
rounds alternate, so machine noise hits all alike; medians.

- torch (`--ckpt-format torch`): one rank file, `atomic_torch_save` (written
  aside, fsynced, renamed; the SHA-256 computed while writing), loaded with
  `read_checkpoint_file` (torch.load mmap, weights_only; the checksum
  verified by one more read of the file) and every tensor read.
- torch_dist, synchronous and `--async-save`: the state as megatron-core
  ShardedTensors, saved by the driver's `save_sharded_state` on one gloo rank
  (megatron-core's two writer processes per rank, hashing as they write;
  common.pt, .metadata and metadata.json hashed by rank 0 when the save is
  published). "Blocked" is until the save call returns (the training loop's
  wait), "published" until the tracker names the checkpoint. Loaded through
  the driver's safe load strategies with every tensor read, without and with
  `checksums.verify` first (--ckpt-checksum at load: one more read of every
  file).

The files are in the page cache when they are loaded (just written), so the
load overhead measured is the hashing itself; from cold storage add one more
read of the files at the disk's bandwidth. The hash: SHA-256 and BLAKE2b are
timed on this machine too (why SHA-256). Other processes share the machine's
cores: the load average (os.getloadavg) before and after is printed with the
numbers, to rerun when it is high.
"""

import argparse
import gc
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TENSOR_MB = 16
DIST_MODES = ("sync", "async")


def make_state(size_mb: int) -> dict:
    import torch

    per = TENSOR_MB * (1 << 20) // 4
    n = max(3, size_mb // TENSOR_MB) // 3
    gen = torch.Generator().manual_seed(0)
    weights = {f"decoder.layers.{i}.weight": torch.randn(per, generator=gen) for i in range(n)}
    moments = {k: (torch.randn(per, generator=gen), torch.rand(per, generator=gen)) for k in weights}
    return {"model": weights, "optimizer": moments, "iteration": 1}


def state_bytes(state: dict) -> int:
    return sum(t.numel() * 4 for t in state["model"].values()) * 3


# ---------------------------------------------------------------- torch

def time_torch_round(state: dict, rank_dir: str, checksum: bool) -> tuple:
    """(save s, load s) of one round of the per-rank torch format."""
    from megatron.training.checkpoint.files import CHECKSUM_FILE, atomic_torch_save, write_checksums
    from megatron.training.checkpoint.iterations import read_checkpoint_file

    path = os.path.join(rank_dir, "model_optim_rng.pt")
    manifest = os.path.join(rank_dir, CHECKSUM_FILE)
    if os.path.exists(manifest):
        os.remove(manifest)
    t0 = time.perf_counter()
    digest = atomic_torch_save(state, path, checksum)
    if checksum:
        write_checksums(rank_dir, {"model_optim_rng.pt": digest})
    t1 = time.perf_counter()
    loaded = read_checkpoint_file(path)
    total = sum(float(t.sum()) for t in loaded["model"].values())  # every tensor read
    total += sum(float(a.sum() + b.sum()) for a, b in loaded["optimizer"].values())
    t2 = time.perf_counter()
    assert total == total  # not NaN: the data was really read
    return t1 - t0, t2 - t1


# ---------------------------------------------------------------- torch_dist

def sharded(state: dict, like: bool = False) -> dict:
    """The state as megatron-core ShardedTensors (empty ones to load into, when `like`)."""
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    def wrap(key, t):
        return ShardedTensor.from_rank_offsets(key, torch.empty_like(t) if like else t, replica_id=0)

    out = {"model": {k: wrap(k, t) for k, t in state["model"].items()},
           "optimizer": {k: [wrap(f"optimizer.exp_avg.{k}", a), wrap(f"optimizer.exp_avg_sq.{k}", b)]
                         for k, (a, b) in state["optimizer"].items()}}
    if not like:
        out["iteration"] = state["iteration"]
    return out


def time_dist_round(state: dict, work: str, mode: str, checksum: bool, index: int) -> tuple:
    """(blocked s, published s, load s) of one torch_dist round."""
    from megatron.core import dist_checkpointing

    from megatron.training.checkpoint.torch_dist import checksums, save
    from megatron.training.checkpoint.torch_dist.safe_load import SafeCommonLoadStrategy, SafeShardedLoadStrategy

    root = os.path.join(work, f"dist_{index}")
    args = argparse.Namespace(save=root, async_save=mode == "async", ckpt_checksum=checksum,
                              ckpt_fully_parallel_save=False, use_persistent_ckpt_worker=False)
    t0 = time.perf_counter()
    iter_dir = save.save_sharded_state(args, 1, lambda: sharded(state), {})
    t1 = time.perf_counter()
    save.finalize_async_saves(blocking=True)
    t2 = time.perf_counter()
    if checksum:
        assert checksums.verify(iter_dir, log=None)
    loaded = dist_checkpointing.load(sharded(state, like=True), iter_dir, SafeShardedLoadStrategy(),
                                     SafeCommonLoadStrategy())
    total = sum(float(t.sum()) for t in loaded["model"].values())  # every tensor read
    total += sum(float(a.sum() + b.sum()) for a, b in loaded["optimizer"].values())
    t3 = time.perf_counter()
    assert total == total
    shutil.rmtree(root)
    del loaded
    gc.collect()  # the loaded state sits in reference cycles: freed now, not rounds later (1 GB a round)
    return t1 - t0, t2 - t0, t3 - t2


def hash_rates(mb: int = 256, rounds: int = 3) -> dict:
    """MB/s of SHA-256 and BLAKE2b over `mb` MB in memory (medians)."""
    data = os.urandom(mb << 20)
    rates = {}
    for name in ("sha256", "blake2b"):
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            hashlib.new(name, data).digest()
            times.append(time.perf_counter() - t)
        rates[name] = len(data) / 1e6 / statistics.median(times)
    return rates


def _row(label: str, plain: float, checked: float, mb: float) -> str:
    return (f"| {label} | {plain:.3f} | {checked:.3f} | {100 * (checked - plain) / plain:+.0f}% | "
            f"{mb / plain:,.0f} / {mb / checked:,.0f} |")


def run(size_mb: int, rounds: int, work_dir=None) -> str:
    """The report of one run (markdown)."""
    import torch

    from megatron.training import cpu_backend
    from megatron.training.checkpoint.torch_dist import save

    load_before = os.getloadavg()
    state = make_state(size_mb)
    mb = state_bytes(state) / 1e6
    torch_times = {False: [], True: []}
    dist_times = {(m, c): [] for m in DIST_MODES for c in (False, True)}
    cpu_backend.activate()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        save.start_writer_queue()  # as the driver does before training: outside the saves' times
        with tempfile.TemporaryDirectory(dir=work_dir) as work:
            rank_dir = os.path.join(work, "torch")
            os.makedirs(rank_dir)
            count = 0
            for r in range(-1, rounds):  # round -1 warms up, uncounted (the first async save forks its writers)
                for checksum in (False, True):
                    times = time_torch_round(state, rank_dir, checksum)
                    if r >= 0:
                        torch_times[checksum].append(times)
                for mode in DIST_MODES:
                    for checksum in (False, True):
                        times = time_dist_round(state, work, mode, checksum, count)
                        count += 1
                        if r >= 0:
                            dist_times[(mode, checksum)].append(times)
    finally:
        torch.distributed.destroy_process_group()
    load_after = os.getloadavg()
    rates = hash_rates()

    def median(times, i):
        return statistics.median(t[i] for t in times)

    torch_rows = [_row(what, median(torch_times[False], i), median(torch_times[True], i), mb)
                  for i, what in enumerate(("save", "load"))]
    dist_rows = []
    for mode in DIST_MODES:
        plain, checked = dist_times[(mode, False)], dist_times[(mode, True)]
        if mode == "sync":
            dist_rows.append(_row("sync save (blocked = published)", median(plain, 1), median(checked, 1), mb))
        else:
            dist_rows.append(_row("--async-save: training blocked", median(plain, 0), median(checked, 0), mb))
            dist_rows.append(_row("--async-save: until published", median(plain, 1), median(checked, 1), mb))
    loads = [t for m in DIST_MODES for t in dist_times[(m, False)]], [t for m in DIST_MODES
                                                                       for t in dist_times[(m, True)]]
    dist_rows.append(_row("load (with: --ckpt-checksum verifies first)", median(loads[0], 2), median(loads[1], 2), mb))
    header = ["| | without (s) | with --ckpt-checksum (s) | overhead | MB/s without / with |", "|---|---:|---:|---:|---:|"]
    return "\n".join([
        "# --ckpt-checksum: save and load cost",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. One state of {mb:,.0f} MB "
        f"(fp32 weights + Adam moments), {rounds} rounds of each kind, alternating, medians; the files are in the "
        f"page cache when loaded. Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.1f}' for x in load_after)}.",
        "",
        "## --ckpt-format torch (one rank file)",
        "",
        *header,
        *torch_rows,
        "",
        "## --ckpt-format torch_dist (one rank, megatron-core's two writer processes)",
        "",
        *header,
        *dist_rows,
        "",
        f"Hashing in memory on this machine: SHA-256 {rates['sha256']:,.0f} MB/s, BLAKE2b {rates['blake2b']:,.0f} "
        "MB/s (256 MB, median of 3).",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="size of the state")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind (alternating)")
    p.add_argument("--work-dir", default=None, help="where the files are written (default: a temporary folder)")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    from bench_report import emit

    emit(run(args.size_mb, args.rounds, args.work_dir), args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
