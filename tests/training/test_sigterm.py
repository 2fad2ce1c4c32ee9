"""errors.sigterm_as_exit: SIGTERM unwinds the process that set it (partial
outputs are removed on the way), kills a process forked inside the block as the
default action would, and the previous handler is back afterwards.

A data tool run inside this test session forks its worker pool; a worker that
met SIGTERM (Pool.terminate) between fork and its own handler used to raise
SystemExit there, unwinding the session's stack in the child, which then ran
the rest of the test session a second time."""

import os
import signal

import pytest

from megatron.training.errors import sigterm_as_exit


def test_sigterm_unwinds_the_owner_and_kills_a_forked_child():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_exit("stopped by signal {signum}"):
        pid = os.fork()
        if pid == 0:  # the child: dies of the signal; 3 would mean the handler raised here
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
        with pytest.raises(SystemExit, match=f"stopped by signal {int(signal.SIGTERM)}"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
