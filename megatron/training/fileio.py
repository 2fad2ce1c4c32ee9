"""Crash-safe writes of small files, shared by the driver, the tools, the
tasks and the benchmarks, and the clean-up of what a killed writer left.

- `atomic_write_text`: the file is written aside, fsynced and renamed (and
  the rename fsynced), so a reader sees the old file or the new one, never half.
- `append_synced`: one append to a jsonl journal (partial results, manifests),
  fsynced before the caller counts it as done; a kill mid-append leaves at
  most a torn last line, which the readers cut off.
- `temp_name`: every writer's aside name, `PATH.tmp-PID`. A writer removes it
  on every failure it sees; a killed one cannot, so `sweep_stale_temps` removes
  those whose process is gone at the next run. A temporary of a running
  process is never touched: its PID must be dead, or taken by a process that
  started after the file was last written (PID reuse; Linux start times).
"""

import errno
import os
import re
import shutil
from typing import Callable, List, Optional, Tuple

_TEMP = re.compile(r"\.tmp-(\d+)(?:\.|$)")


def temp_name(path: str) -> str:
    """Where `path` is written before it is renamed into place."""
    return f"{path}.tmp-{os.getpid()}"


def remove_quietly(*paths: str) -> None:
    """Remove files (or folders) that may not exist; clean-up never raises."""
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
        except OSError:
            pass


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's entries: creations, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` aside and rename it into place (parent folders
    are created); on any failure (a full disk) the aside file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(folder)


def append_synced(path: str, text: str) -> None:
    """Append `text` to `path` and fsync it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# What to do about an OSError met while writing outputs, by errno.
OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free space, or write to another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space, or write to another disk",
    errno.EACCES: "no permission to write there: choose a folder you can write to",
    errno.EPERM: "no permission to write there: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable folder",
}


def describe_os_error(e: OSError, flag: str = "--output-prefix") -> str:
    """One line for an OSError met while writing: the file, the reason, the fix."""
    where = f"{e.filename}: " if e.filename else ""
    fix = OS_ERROR_FIXES.get(e.errno)
    return f"{where}{e.strerror or e}" + (f"; {fix} ({flag})" if fix else "")


def temp_owner(name: str) -> Optional[int]:
    """The PID in a `temp_name` (`X.tmp-PID`, or `X.tmp-PID.suffix` for files
    written under a temporary prefix); None for other names."""
    m = _TEMP.search(os.path.basename(name))
    return int(m.group(1)) if m else None


def _process_state(pid: int) -> Tuple[Optional[str], Optional[float]]:
    """(state letter, start time in seconds since the epoch) of process
    `pid`, where /proc tells; (None, None) elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return fields[0].decode(), boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


def owner_is_gone(path: str, pid: int) -> bool:
    """True when the process that wrote `path` (a temporary named with `pid`)
    cannot still be running: no process has that PID (or only a zombie), or
    the one that has it started after `path` was last modified (the PID was
    reused)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:
        pass  # alive, another user's
    state, started = _process_state(pid)
    try:
        modified = os.stat(path).st_mtime
    except FileNotFoundError:
        return False  # its owner just renamed or removed it
    # Start times have clock-tick resolution (10 ms) and boot-time rounding: 2 s of slack.
    return state == "Z" or (started is not None and started > modified + 2.0)


def remove_entries(folder: str, is_stale: Callable[[str, str], bool], log=None,
                   what: str = "temporary file(s) left by killed runs") -> List[str]:
    """Remove the entries of `folder` for which `is_stale(name, path)`;
    returns their paths (and logs how many, when there were some)."""
    try:
        names = sorted(os.listdir(folder or "."))
    except OSError:
        return []
    removed = [os.path.join(folder, n) for n in names if is_stale(n, os.path.join(folder, n))]
    remove_quietly(*removed)
    if removed and log is not None:
        log(f"removed {len(removed)} {what} in {folder or '.'} (e.g. {os.path.basename(removed[0])})")
    return removed


def is_stale_temp(name: str, path: str) -> bool:
    """Whether `name` is a temporary (`temp_name`) whose writer is gone."""
    pid = temp_owner(name)
    return pid is not None and owner_is_gone(path, pid)


def sweep_stale_temps(folder: str, name_prefix: str = "", log=None) -> List[str]:
    """Remove the temporaries of dead writers among the entries of `folder`
    whose name starts with `name_prefix`; returns their paths."""
    return remove_entries(folder, lambda name, path: name.startswith(name_prefix) and is_stale_temp(name, path), log)
