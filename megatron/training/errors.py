"""One error path for every entry point.

A mistake a user can fix (a flag, a file, a checkpoint that does not fit the
run) raises a `UserError` whose message is one line: what is wrong, where, and
the fix. Every entry point runs its body through `run_main`:

    def main(argv=None) -> int:
        return run_main(run, argv)            # tools: 0, or 2 after `error: ...`

    if __name__ == "__main__":
        sys.exit(run_main(main))              # training entry points

which prints `error: <message>` once on stderr and returns exit status 2, with
no traceback. FINLLAMA_TRACEBACK=1 re-raises instead, so Python prints the
full traceback (exit status 1). Any other exception is a bug and keeps its
traceback.

Several processes (torchrun): one line for the whole job. Before the process
group exists an error comes from the flags, which every rank shares, so rank 0
prints it (an error only another rank sees that early, such as a file one
node lacks, is then named by torchrun's summary alone). Afterwards the failing
ranks agree through the process group's key-value store: the lowest rank that
hit an error prints it (a rank above 0 waits up to `GRACE_SECONDS` for a lower
one), at most once, and rank 0, which hosts the store outside torchrun, keeps
it up until the other failing ranks are done with it. A rank that fails only
because another rank reported an error and left (a collective whose peer is
gone) exits 2 quietly. Every failing rank also writes torchelastic's error
file, so torchrun's failure summary, which it prints after any non-zero exit,
shows this line as the failure's "traceback" instead of a link to its docs.

`Parser` is argparse for every entry point: exact flag names only (no silent
prefix matching) and errors raised as `ArgumentError`, so a bad command line
is one line too, with the closest known flag names for a misspelt one.
"""

import argparse
import contextlib
import difflib
import json
import os
import signal
import sys
import time
from typing import Callable, List, Optional

USER_ERROR_EXIT_CODE = 2
TRACEBACK_ENV = "FINLLAMA_TRACEBACK"
GRACE_SECONDS = 1.0  # how long a rank above 0 waits for a lower rank's report
_STORE_LOWEST = "finllama/user_error/lowest_rank"  # lowest rank that hit an error
_STORE_PRINTED = "finllama/user_error/printed"  # incremented by the rank that prints
_STORE_LEFT = "finllama/user_error/left"  # failing ranks done with the store


class UserError(Exception):
    """A problem the user can fix; the message is one line naming what, where and the fix."""


class ArgumentError(UserError, ValueError):
    """A flag or layout problem; the message says what to change."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


class OutputError(UserError, OSError):
    """An output that could not be written (a full disk, a read-only folder); the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse with exact flag names only (no silent prefix matching), errors
    raised as ArgumentError, and an unknown-flag error that names the closest
    known flags."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def known_flags(self) -> List[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = self.known_flags()
            problems = []
            for item in unknown:
                if not item.startswith("-"):
                    problems.append(f"unexpected value {item!r} (does a flag before it take no value?)")
                    continue
                name = item.split("=", 1)[0]
                close = difflib.get_close_matches(name, flags, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                problems.append(f"unknown flag {name}{hint}")
            raise ArgumentError(f"{self.prog}: " + "; ".join(problems))
        return parsed

    def error(self, message):
        raise ArgumentError(f"{self.prog}: {message} (see {self.prog} --help)")


@contextlib.contextmanager
def os_errors_as_output_errors(outcome: str, flag: str = "--output-prefix"):
    """Re-raise an OSError of the block (a full disk, a read-only folder) as
    an OutputError: the file, the reason, the fix for `flag`, and `outcome`
    (e.g. "partial outputs removed")."""
    from megatron.training.fileio import describe_os_error

    try:
        yield
    except OSError as e:
        if isinstance(e, UserError):
            raise
        raise OutputError(f"{describe_os_error(e, flag)}; {outcome}") from None


@contextlib.contextmanager
def sigterm_as_exit(message: str):
    """Within the block SIGTERM stops this process like Ctrl-C: SystemExit(message)
    unwinds it, so the cleanup of partial outputs runs. A process forked inside the
    block (a worker pool) that meets SIGTERM before it sets its own handler dies of
    the signal as by default; raising there would unwind the parent's stack in the
    child (a test session forked by a pool would go on running the session). The
    previous handler is back after the block."""
    owner = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(message.format(signum=signum))

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(main: Callable, *args) -> int:
    """Call `main(*args)` and return the exit status: its own when it returns
    an int, else 0; 2 after reporting a UserError in one line."""
    try:
        result = main(*args)
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        report(e)
        return USER_ERROR_EXIT_CODE
    except Exception:
        if os.environ.get(TRACEBACK_ENV) != "1" and _another_rank_reported():
            return USER_ERROR_EXIT_CODE  # a consequence of the error that rank printed
        raise
    return result if isinstance(result, int) else 0


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run on for lines)."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split(". ")[0].rstrip(".")[:160]


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line."""
    return "error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def report(e: UserError) -> None:
    """Print the error line if this process speaks for the job; record it for torchrun."""
    line = error_line(e)
    _write_torchelastic_error_file(line)
    dist = _process_group()
    if dist is None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(line, file=sys.stderr, flush=True)
        return
    rank, store, prints = dist.get_rank(), None, dist.get_rank() == 0
    try:
        store = dist.distributed_c10d._get_default_store()
        prints = _claim_report(store, rank)
    except Exception:  # noqa: BLE001 - no store to agree through: rank 0 speaks for the job
        pass
    if prints:
        print(line, file=sys.stderr, flush=True)
    if store is not None:
        _leave(store, rank, dist.get_world_size())


def _process_group():
    """torch.distributed when a process group of more than one rank is up, else None
    (never imports torch: light tools stay light)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def _claim_report(store, rank: int) -> bool:
    """Whether `rank` is the lowest rank that reported an error (waiting up to
    GRACE_SECONDS for a lower one) and the first to claim the printing."""
    lowest = _store_min(store, _STORE_LOWEST, rank)
    deadline = time.monotonic() + (GRACE_SECONDS if rank > 0 else 0.0)
    while lowest == rank and time.monotonic() < deadline:
        time.sleep(0.05)
        lowest = int(store.get(_STORE_LOWEST))
    return lowest == rank and store.add(_STORE_PRINTED, 1) == 1


def _leave(store, rank: int, world_size: int) -> None:
    """Count this rank out of the store. Rank 0 hosts the store (unless
    torchrun's agent does): it waits, up to GRACE_SECONDS, for the other
    failing ranks to be done with it before its process exits and takes the
    store along."""
    try:
        left = store.add(_STORE_LEFT, 1)
        deadline = time.monotonic() + GRACE_SECONDS
        while rank == 0 and left < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            left = store.add(_STORE_LEFT, 0)
    except Exception:  # noqa: BLE001 - the store is gone: nobody is left to wait for
        pass


def _store_min(store, key: str, value: int) -> int:
    """Atomically lower the integer at `key` to `value` (set it when absent);
    returns the value now stored."""
    current = int(store.compare_set(key, "", str(value)))
    while current > value:
        # compare_set returns the stored value: `value` when the swap took place
        current = int(store.compare_set(key, str(current), str(value)))
    return current


def _another_rank_reported() -> bool:
    dist = _process_group()
    if dist is None:
        return False
    try:
        return dist.distributed_c10d._get_default_store().check([_STORE_LOWEST])
    except Exception:  # noqa: BLE001 - the store went away with its host rank: nothing known
        return False


def _write_torchelastic_error_file(line: str) -> None:
    """torchrun reads this file (its @record protocol) for the failure summary."""
    path: Optional[str] = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then shows torchrun's generic text; the error line was printed anyway
