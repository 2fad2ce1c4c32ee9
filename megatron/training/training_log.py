"""What the training loop prints and writes to TensorBoard.

The log line keeps Megatron-LM's field names (scripts that grep
"elapsed time per iteration (ms)" or "lm loss" keep working) and adds tokens/s
per GPU and tokens/day for the whole job.
"""

import datetime
import math
from typing import Dict, Optional

import torch

from megatron.training.flops import throughput


def is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_0(*parts) -> None:
    if torch.distributed.get_rank() == 0:
        print(*parts, flush=True)


def print_rank_last(*parts) -> None:
    if is_last_rank():
        print(*parts, flush=True)


class TrainingLogger:
    """Accumulates per-iteration values between log lines; printing happens on
    the last rank (the last pipeline stage, where the loss lives)."""

    def __init__(self, args, flops_per_iteration: float):
        self.args = args
        self.flops_per_iteration = flops_per_iteration
        self.writer = None
        if args.tensorboard_dir and is_last_rank():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional dependency
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        self._reset()
        self.total_skipped = 0
        self.total_nan = 0
        self.last_values: Dict[str, float] = {}

    def _reset(self) -> None:
        self.loss_sums: Dict[str, torch.Tensor] = {}
        self.iterations = 0
        self.skipped = 0
        self.nan = 0
        self.elapsed = 0.0

    def add(self, losses: Dict[str, torch.Tensor], skipped: bool, elapsed: float) -> None:
        """Record one iteration; losses stay tensors (no host sync per step)."""
        self.iterations += 1
        self.elapsed += elapsed
        self.skipped += int(skipped)
        if skipped:
            return
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value

    def log(self, iteration: int, consumed_samples: int, lr: float, grad_norm: Optional[float],
            loss_scale: float, tokens_per_iteration: int) -> Dict[str, float]:
        """Print one Megatron-style line for the iterations since the last call."""
        args = self.args
        counted = max(self.iterations - self.skipped, 1)
        losses = {k: float(v) / counted for k, v in self.loss_sums.items()}
        nan_now = sum(1 for v in losses.values() if not math.isfinite(v))
        self.total_skipped += self.skipped
        self.total_nan += nan_now
        per_iter = self.elapsed / max(self.iterations, 1)
        tput = throughput(self.flops_per_iteration, per_iter, tokens_per_iteration, args.world_size)
        total_iters = args.train_iters
        fields = [
            f"iteration {iteration:8d}/{total_iters:8d}",
            f"consumed samples: {consumed_samples:12d}",
            f"elapsed time per iteration (ms): {per_iter * 1000:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {tput.tflops_per_gpu:.3f}",
            f"tokens/s/GPU: {tput.tokens_per_second_per_gpu:.1f}",
            f"tokens/day (job): {tput.tokens_per_day / 1e9:.4f}B",
            f"learning rate: {lr:.6E}",
            f"global batch size: {args.global_batch_size:5d}",
        ]
        fields += [f"{k}: {v:.6E}" for k, v in losses.items()]
        fields += [
            f"loss scale: {loss_scale:.1f}",
            f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: n/a",
            f"number of skipped iterations: {self.skipped:3d}",
            f"number of nan iterations: {nan_now:3d}",
        ]
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print_rank_last(f" [{stamp}] " + " | ".join(fields) + " |")
        values = dict(losses, lr=lr, grad_norm=grad_norm or 0.0, loss_scale=loss_scale,
                      ms_per_iteration=per_iter * 1000, tflops_per_gpu=tput.tflops_per_gpu,
                      tokens_per_second_per_gpu=tput.tokens_per_second_per_gpu, tokens_per_day=tput.tokens_per_day)
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(key, value, iteration)
                self.writer.add_scalar(f"{key} vs samples", value, consumed_samples)
            self.writer.add_scalar("learning-rate", lr, iteration)
            self.writer.add_scalar("loss-scale", loss_scale, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
            self.writer.add_scalar("iteration-time", per_iter, iteration)
            self.writer.add_scalar("throughput/tflops_per_gpu", tput.tflops_per_gpu, iteration)
            self.writer.add_scalar("throughput/tokens_per_second_per_gpu", tput.tokens_per_second_per_gpu, iteration)
            self.writer.flush()
        self.last_values = values
        self._reset()
        return values

    def log_validation(self, iteration: int, losses: Dict[str, float], prefix: str = "validation") -> None:
        parts = []
        for key, value in losses.items():
            parts.append(f"{key} value: {value:.6E}")
            if self.writer is not None:
                self.writer.add_scalar(f"{key} {prefix}", value, iteration)
            if key.endswith("lm loss"):  # a perplexity only for language-model losses
                ppl = math.exp(min(20.0, value))
                parts[-1] += f" | {key} PPL: {ppl:.6E}"
                if self.writer is not None:
                    self.writer.add_scalar(f"{key} {prefix} ppl", ppl, iteration)
        line = f" {prefix} loss at iteration {iteration} | " + " | ".join(parts) + " |"
        print_rank_last("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
