"""Checkpoints that are what they claim to be (the per-rank `torch` format of
checkpointing.py):

- `--ckpt-checksum`: every file a rank writes gets its SHA-256, computed while
  the file is written (no second read), listed in `checksums.sha256` beside
  it in `sha256sum -c` format. A checkpoint that has them is verified on load,
  so a flipped byte inside a tensor is reported, naming the file, instead of
  being trained on.
- `--ckpt-step N` (Megatron-LM's flag): load iteration N instead of the one
  the tracker names; what a failed load tells the user to pass.
- `last_complete_iteration`: the newest iteration whose rank files are all
  there and open, for load errors to name.
- `sweep_save_dir`: what killed saves left in --save (`iter_N.partial/`,
  `*.tmp-PID` of dead processes, `iter_N.old` beside a complete `iter_N`),
  removed by rank 0 before each save (so at the first save of the next run).
"""

import hashlib
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron.training.fileio import atomic_write_text, is_stale_temp, owner_is_gone, remove_entries, temp_owner

CHECKSUM_FILE = "checksums.sha256"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_READ_BYTES = 16 << 20


def add_checkpoint_integrity_args(parser) -> None:
    g = parser.add_argument_group("checkpoint integrity")
    g.add_argument("--ckpt-checksum", action="store_true",
                   help="write the SHA-256 of every checkpoint file (checksums.sha256 in each rank directory, "
                        "`sha256sum -c` format); checkpoints that have them are verified on load")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the one its tracker file names")


# ---------------------------------------------------------------- checksums

class CheckpointFileWriter:
    """A binary file object for torch.save that hashes what is written through
    it (when `checksum`) and keeps the first OSError of a write: torch.save
    reports a full disk as "RuntimeError: ... unexpected pos", and the
    OSError is what says what happened."""

    def __init__(self, f, checksum: bool):
        self._f = f
        self.sha256 = hashlib.sha256() if checksum else None
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        if self.sha256 is not None:
            self.sha256.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_BYTES)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def write_checksums(rank_dir: str, digests: Dict[str, str]) -> None:
    """`checksums.sha256` for the files of one rank directory (name -> hex digest)."""
    atomic_write_text(os.path.join(rank_dir, CHECKSUM_FILE),
                      "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())))


def read_checksums(rank_dir: str) -> Dict[str, str]:
    """name -> hex digest from a rank directory's checksums.sha256 ({} when absent)."""
    path = os.path.join(rank_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            digest, _, name = line.strip().partition("  ")
            if name:
                out[name] = digest
    return out


def checksum_problem(path: str) -> Optional[str]:
    """Why `path` does not match the checksum recorded beside it, or None
    (it matches, or no checksum was recorded)."""
    expected = read_checksums(os.path.dirname(path)).get(os.path.basename(path))
    if expected is None:
        return None
    actual = sha256_file(path)
    if actual != expected:
        return (f"its SHA-256 {actual[:16]}... differs from the {expected[:16]}... recorded in {CHECKSUM_FILE} "
                "when it was saved (the file changed on disk: a bad copy, disk or memory error)")
    return None


# ---------------------------------------------------------------- complete iterations

def iteration_dirs(root: str) -> List[Tuple[int, str]]:
    """(iteration, directory) of the finished `iter_XXXXXXX` directories of `root`, newest first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in names for m in [_ITER_DIR.match(n)] if m]
    return sorted(found, reverse=True)


def incomplete_reason(iter_dir: str) -> Optional[str]:
    """Why `iter_dir` cannot be loaded (a rank file missing or unreadable), or
    None when every rank file of its saved layout is there and opens (for a
    torch_dist directory: dist_ckpt.safe_load.incomplete_reason)."""
    if os.path.isfile(os.path.join(iter_dir, "metadata.json")):
        from megatron.training.dist_ckpt.safe_load import incomplete_reason as torch_dist_reason

        return torch_dist_reason(iter_dir)
    ranks = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_")) if os.path.isdir(iter_dir) else []
    layout = None
    for name in ranks:
        path = os.path.join(iter_dir, name, "model_optim_rng.pt")
        try:
            layout = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["layout"]
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            return f"{path} does not open ({first_line(e)})"
    if layout is None:
        return f"{iter_dir} holds no mp_rank_* directory"
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    expected = {f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)}
    missing = sorted(expected - set(ranks))
    return f"{os.path.join(iter_dir, missing[0])} is missing" if missing else None


def last_complete_iteration(root: str, below: Optional[int] = None) -> Optional[Tuple[int, str]]:
    """The newest (iteration, directory) of `root` below `below` whose rank
    files are all there and open; None when there is none."""
    for iteration, path in iteration_dirs(root):
        if (below is None or iteration < below) and incomplete_reason(path) is None:
            return iteration, path
    return None


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run on for lines)."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split(". ")[0].rstrip(".")[:160]


# ---------------------------------------------------------------- what killed saves left

def sweep_save_dir(root: str, log=None) -> List[str]:
    """Remove from a checkpoint root what killed saves left: `iter_N.partial/`
    directories in which no file is being written by a live process,
    `*.tmp-PID` files of dead processes, and `iter_N.old/` when `iter_N` is
    complete (a re-save killed before the old copy was removed). Returns the
    paths removed. Called before each save, when no rank of this run is
    writing; another job must not save to the same directory."""

    def stale(name: str, path: str) -> bool:
        if not (name.startswith("iter_") and os.path.isdir(path)):
            return is_stale_temp(name, path)
        if name.endswith(PARTIAL_SUFFIX):
            return not _being_written(path)
        final = path[: -len(OLD_SUFFIX)]
        return name.endswith(OLD_SUFFIX) and os.path.isdir(final) and incomplete_reason(final) is None

    return remove_entries(root, stale, log, "leftover(s) of interrupted saves")


def _being_written(folder: str) -> bool:
    """Whether a live process is writing a `*.tmp-PID` file under `folder`."""
    for parent, _, files in os.walk(folder):
        for name in files:
            pid = temp_owner(name)
            if pid is not None and not owner_is_gone(os.path.join(parent, name), pid):
                return True
    return False
