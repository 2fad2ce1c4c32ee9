"""--exit-signal-handler (issue #15, finding 4): SIGTERM, as Slurm sends it to
torchrun before a time limit or on preemption, saves the iteration in
progress, and a resumed run continues exactly as an uninterrupted one."""

import os
import random
import re
import signal
import subprocess
import sys

import pytest

from tests.distributed.launcher import ROOT, free_port
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain_sequence

PRETRAIN = os.path.join(ROOT, "pretrain_gpt.py")
# Dropout on: the resumed run matches only if the RNG states were saved too.
ARGV = TINY_LLAMA + MOCK_DATA + SCHEDULE + ["--micro-batch-size", "2", "--global-batch-size", "4",
                                            "--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
_LOG = re.compile(r"iteration\s+(\d+)/\s*\d+ .*\| lm loss: (\S+) \|")


def _interrupt(command, after_iteration, sig):
    """Run `command`, send `sig` to it once it logs `after_iteration`; returns
    (exit status, [(iteration, printed loss)], output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    logged, output = [], []
    for line in proc.stdout:
        output.append(line)
        m = _LOG.search(line)
        if m:
            logged.append((int(m.group(1)), m.group(2)))
            if logged[-1][0] == after_iteration:
                proc.send_signal(sig)
    return proc.wait(timeout=300), logged, "".join(output)


# Runs a script as torchrun's worker and leaves a file behind only if the
# script finished with exit status 0 (returning, or sys.exit(0) as the entry
# points end): torchrun, shutting down on a signal, reports no exit status of
# its workers.
_WORKER = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
open(os.path.join({done!r}, "rank" + os.environ["RANK"]), "w").close()
"""


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_that_iteration_and_the_resumed_run_is_exact(tmp_path):
    signal_after = random.randint(2, 6)
    ckpt, done = str(tmp_path / "ckpt"), tmp_path / "done"
    done.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER.format(done=str(done)))
    argv = ARGV + ["--train-iters", "12", "--save", ckpt, "--exit-signal-handler"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(worker), PRETRAIN]
    status, logged, output = _interrupt(torchrun + argv, signal_after, signal.SIGTERM)
    saved = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    # The ranks finished the iteration they were in, agreed, saved it and returned normally.
    assert logged[-1][0] == saved and signal_after <= saved < 12, (signal_after, output[-3000:])
    assert f"exiting at iteration {saved}: received SIGTERM (--exit-signal-handler)" in output
    assert sorted(os.listdir(ckpt)) == [f"iter_{saved:07d}", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(done)) == ["rank0", "rank1"], output[-3000:]
    assert status != 0  # torchrun itself re-raises the signal once its workers are done (see the README)

    straight, resumed = run_pretrain_sequence([ARGV + ["--train-iters", "12"], argv + ["--load", ckpt]], world_size=2)
    assert [it for it, _, _ in resumed] == list(range(saved + 1, 13))
    # Bitwise: weights, optimizer moments, LR schedule, data position and dropout masks all came back.
    assert [(loss, g) for _, loss, g in resumed] == [(loss, g) for _, loss, g in straight[saved:]]
    assert [loss for _, loss in logged] == [f"{loss:E}" for _, loss, _ in straight[:saved]]


def test_exit_signal_handler_catches_the_named_signal_and_restores_the_previous_handler():
    from megatron.training.exit_signal import ExitSignalHandler, signal_by_name

    assert signal_by_name("SIGUSR1") == signal_by_name("usr1") == signal.SIGUSR1
    before = signal.getsignal(signal.SIGUSR1)
    with ExitSignalHandler("SIGUSR1") as handler:
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert handler._received
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not ExitSignalHandler(None).received_anywhere()  # off: no collective, nothing received
