"""--exit-signal-handler (Megatron-LM's flag): save and exit 0 on SIGTERM.

Slurm sends SIGTERM before a job's time limit (`#SBATCH --signal=TERM@120`
sends it 120 s early) and on preemption; torchrun forwards it to its
workers. Without a handler the workers die and the iterations since the last
save are lost. With it, the signal only sets a flag: every rank finishes the
iteration it is in, the ranks agree (a MAX all-reduce of the flag after every
iteration, so a rank that missed the signal stops at the same iteration), the
checkpoint of that iteration is saved, and the run returns normally (exit
status 0), skipping the final evaluations as --exit-interval does.

torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) for its
workers after forwarding the signal before it kills them: give it the time an
iteration plus a save takes (scripts/slurm/pretrain.sbatch sets it).
"""

import signal
from typing import Optional

import torch


def signal_by_name(name: str) -> signal.Signals:
    """`SIGTERM` (or `TERM`) -> signal.SIGTERM; argparse's type for --exit-signal."""
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return signal.Signals[key]
    except KeyError:
        import argparse

        raise argparse.ArgumentTypeError(f"{name!r} is not a signal name: give one such as SIGTERM, SIGUSR1, SIGINT")


def add_exit_signal_args(parser) -> None:
    g = parser.add_argument_group("preemption")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal every rank finishes its iteration, the checkpoint is saved to --save and "
                        "the run exits 0 (for Slurm time limits and preemption)")
    g.add_argument("--exit-signal", type=lambda name: signal_by_name(name).name, default="SIGTERM",
                   help="the signal --exit-signal-handler acts on (default SIGTERM; e.g. SIGUSR1)")


class ExitSignalHandler:
    """A context manager: while it is active, `signum` (None: no handling, and
    no collective either) sets a flag instead of ending the process;
    `received_anywhere()` tells every rank whether any rank got it."""

    def __init__(self, signame: Optional[str]):
        self.signum = signal_by_name(signame) if signame else None
        self._received = False
        self._previous = None

    def __enter__(self) -> "ExitSignalHandler":
        if self.signum is not None:
            self._previous = signal.signal(self.signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    def received_anywhere(self) -> bool:
        """Whether any rank has received the signal. Collective over all ranks
        when handling is on (call it at the same point on every rank)."""
        if self.signum is None:
            return False
        from megatron.training.initialize import device

        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
