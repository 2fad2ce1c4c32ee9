"""The driver's cost per iteration against a bare loop over the same
megatron-core model, schedule, optimizer and data, side by side in one process.

    python benchmarks/driver_overhead.py [--blocks 6 --iters 10] [--out benchmarks/results/driver_overhead_cpu.md]

Both loops share one model, optimizer, LR scheduler and data loader; blocks of
`--iters` iterations alternate (driver, bare, driver, bare, ...) so machine
noise hits both alike, and the ratio of median block times is reported. The
bare loop is what a user would write by hand with megatron-core: zero the grad
buffers, run `get_forward_backward_func()`, step the optimizer and scheduler.
The driver's loop adds its forward step (batch unpacking), data-parallel loss
averaging, logging bookkeeping and exit checks.
"""

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "688", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", "256", "--max-position-embeddings",
         "256", "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--use-flash-attn",
         "--attention-dropout", "0", "--hidden-dropout", "0"]
RUN = ["--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "1e-3", "--mock-data", "--vocab-size", "4096",
       "--log-interval", "1000000", "--eval-interval", "1000000", "--eval-iters", "0", "--train-iters", "100000"]


def bare_loop(model, optimizer, scheduler, data_iterator, args, iters):
    """A hand-written megatron-core training loop."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output_tensor):
            mask = batch["loss_mask"].view(-1).float()
            loss = (output_tensor.float().view(-1) * mask).sum() / mask.sum()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    for _ in range(iters):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data_iterator, model=model[0],
                                    num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size, forward_only=False)
        ok, _, _ = optimizer.step()
        if ok:
            scheduler.step(increment=args.global_batch_size)
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    import torch

    from driver_harness import DriverHarness

    harness = DriverHarness(MODEL + RUN)
    args, model, optimizer, scheduler = harness.args, harness.model, harness.optimizer, harness.scheduler
    data_iterator = harness.data_iterator

    def driver_block():
        harness.train_block(opts.iters)

    driver_block()  # warm-up of both paths
    bare_loop(model, optimizer, scheduler, data_iterator, args, 2)
    driver_times, bare_times = [], []
    for _ in range(opts.blocks):
        t0 = time.perf_counter()
        driver_block()
        driver_times.append((time.perf_counter() - t0) / opts.iters)
        t0 = time.perf_counter()
        bare_loop(model, optimizer, scheduler, data_iterator, args, opts.iters)
        bare_times.append((time.perf_counter() - t0) / opts.iters)

    driver, bare = statistics.median(driver_times), statistics.median(bare_times)
    tokens = args.global_batch_size * args.seq_length
    lines = [
        "# Driver overhead vs a bare megatron-core loop (CPU, one process)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}.",
        f"Model: 4 layers, hidden 256, GQA 8/4 heads, SwiGLU, seq 256, global batch 16 (4 x 4 micro-batches), "
        f"Adam; {opts.blocks} alternating blocks of {opts.iters} iterations; medians.",
        "",
        "| loop | ms / iteration | tokens/s |",
        "|---|---:|---:|",
        f"| driver (`megatron.training.training.train`) | {driver * 1e3:.1f} | {tokens / driver:.0f} |",
        f"| bare megatron-core loop | {bare * 1e3:.1f} | {tokens / bare:.0f} |",
        "",
        f"Ratio driver / bare: **{driver / bare:.3f}** (goal: at most 1.05).",
        "",
        f"Per-block ms/iteration, driver: {', '.join(f'{t * 1e3:.1f}' for t in driver_times)}; "
        f"bare: {', '.join(f'{t * 1e3:.1f}' for t in bare_times)}.",
    ]
    report = "\n".join(lines) + "\n"
    from bench_report import emit

    emit(report, opts.out)


if __name__ == "__main__":
    main()
