"""Crash-safe writes of small files, shared by the driver, the tools, the
tasks and the benchmarks.

- `atomic_write_text`: the file is written aside, fsynced and renamed (and
  the rename fsynced), so a reader sees the old file or the new one, never half.
- `append_synced`: one append to a jsonl journal (partial results, manifests),
  fsynced before the caller counts it as done; a kill mid-append leaves at
  most a torn last line, which the readers cut off.
"""

import os


def temp_name(path: str) -> str:
    """Where `path` is written before it is renamed into place."""
    return f"{path}.tmp-{os.getpid()}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` aside and rename it into place (parent folders are created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def append_synced(path: str, text: str) -> None:
    """Append `text` to `path` and fsync it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
