"""What --ckpt-checksum costs on save and on load.

    python benchmarks/checkpoint_checksum.py --size-mb 1024 --out benchmarks/results/checkpoint_checksum_cpu.md

A rank file of `--size-mb` MB of fp32 tensors (a model's weights plus Adam's
two moments, in tensors of 16 MB) is saved with the driver's own
`atomic_torch_save` (written aside, fsynced, renamed) without and with the
SHA-256 computed while writing, then loaded with the driver's own
`read_checkpoint_file` (torch.load mmap, weights_only) and every tensor read,
as a resumed run reads them, without and with the checksum verified (one more
read of the file). Rounds alternate plain and checksummed; medians.

The file is in the page cache when it is loaded (it was just written), so
the load overhead measured is the hashing itself; from cold storage add one
more read of the file at the disk's bandwidth.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TENSOR_MB = 16


def make_state(size_mb: int) -> dict:
    import torch

    per = TENSOR_MB * (1 << 20) // 4
    n = max(3, size_mb // TENSOR_MB) // 3
    gen = torch.Generator().manual_seed(0)
    weights = {f"decoder.layers.{i}.weight": torch.randn(per, generator=gen) for i in range(n)}
    moments = {k: (torch.randn(per, generator=gen), torch.rand(per, generator=gen)) for k in weights}
    return {"model": weights, "optimizer": moments, "iteration": 1}


def time_round(state: dict, rank_dir: str, checksum: bool) -> tuple:
    """(save s, load s) of one round."""
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="size of the rank file")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind (alternating)")
    p.add_argument("--work-dir", default=None, help="where the file is written (default: a temporary folder)")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    import torch

    from bench_report import emit

    state = make_state(args.size_mb)
    size = sum(t.numel() * 4 for t in state["model"].values()) * 3
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as rank_dir:
        for _ in range(args.rounds):
            for checksum in (False, True):
                times[checksum].append(time_round(state, rank_dir, checksum))
    mb = size / 1e6
    rows = []
    for i, what in enumerate(("save", "load")):
        plain = statistics.median(t[i] for t in times[False])
        checked = statistics.median(t[i] for t in times[True])
        rows.append(f"| {what} | {plain:.3f} | {checked:.3f} | {100 * (checked - plain) / plain:+.0f}% | "
                    f"{mb / plain:,.0f} / {mb / checked:,.0f} |")
    text = "\n".join([
        "# --ckpt-checksum: save and load cost",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        f"One rank file of {mb:,.0f} MB (fp32 weights + Adam moments), {args.rounds} rounds, medians; "
        "the file is in the page cache when loaded.",
        "",
        "| | without (s) | with --ckpt-checksum (s) | overhead | MB/s without / with |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
