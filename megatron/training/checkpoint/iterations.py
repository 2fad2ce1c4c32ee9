"""Where checkpoints live, which of them are complete, and reading one file of
an iteration with the way out named when it fails. Both formats share this
layout; what an iteration directory holds is the format's (torch_format.py,
torch_dist/):

    SAVE/latest_checkpointed_iteration.txt      the tracker: the last complete iteration (or `release`)
    SAVE/iter_0000100/                          one iteration, published by renaming ...
    SAVE/iter_0000100.partial[.<hex>]/          ... its staging directory, once every rank's files are synced
    SAVE/iter_0000100/mp_rank_TT[_PPP]/         per-rank files (--ckpt-format torch)
    SAVE/iter_0000100/metadata.json             a torch_dist iteration (megatron-core's format marker)

- `iteration_to_load(root, step)`: the directory to load: --ckpt-step N, else
  the tracker's iteration.
- `incomplete_reason` / `last_complete_iteration`: the newest iteration whose
  files are all there and open, which load errors name (`with_fallback`).
- `publish_iteration`: staging directory -> iter_N, then the tracker (rank 0).
- `sweep_save_dir`: what killed saves left (`iter_N.partial*/`, `*.tmp-PID` of
  dead processes, `iter_N.old` beside a complete `iter_N`), removed by rank 0
  before each save.
"""

import json
import os
import re
import shutil
from typing import List, Optional, Tuple

import torch

from megatron.training.checkpoint.files import (
    METADATA_FILE, check_size, checksum_problem, common_args, load_common, read_index,
)
from megatron.training.errors import CheckpointError, first_line
from megatron.training.fileio import (
    atomic_write_text, fsync_dir, is_stale_temp, owner_is_gone, remove_entries, temp_owner,
)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
RANK_FILE = "model_optim_rng.pt"
MARKER_FILE = "metadata.json"  # megatron-core's CONFIG_FNAME: what makes an iteration directory torch_dist
# What a metadata.json may say for this driver to read the checkpoint: megatron-core's CheckpointingConfig
# fields, and the backend and version each must name (megatron-core 0.16.1 writes these and reads no other;
# its own check_backend_compatibility accepts anything and fails later).
READABLE_BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


# ---------------------------------------------------------------- names

def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(iter_dir, rank_dir_name(tp_rank, pp_rank, pp_size), RANK_FILE)


def is_torch_dist(iter_dir: str) -> bool:
    """Whether an iteration directory holds a torch_dist checkpoint (megatron-core's
    metadata.json), rather than per-rank mp_rank_* directories. A metadata.json
    that names another backend (zarr, ...) or cannot be read is a
    CheckpointError naming it and the iteration to resume from instead."""
    path = os.path.join(iter_dir, MARKER_FILE)
    if not os.path.isfile(path):
        return False
    problem = marker_problem(path)
    if problem:
        root, iteration = _root_and_iteration(iter_dir)
        raise CheckpointError(with_fallback(root, iteration, problem))
    return True


def marker_problem(path: str) -> Optional[str]:
    """Why the metadata.json at `path` does not describe a checkpoint this
    driver reads (READABLE_BACKENDS), or None."""
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path} is damaged: it is not JSON ({first_line(e)})"
    if not isinstance(config, dict) or "sharded_backend" not in config:
        return f"{path} is damaged: it is not megatron-core's checkpoint description (no sharded_backend)"
    unknown = sorted(set(config) - set(READABLE_BACKENDS))
    if unknown:
        return (f"{path} has the field {unknown[0]!r}, which megatron-core 0.16.1 does not know: the checkpoint was "
                "written by another megatron-core, or the file is damaged")
    for field, readable in READABLE_BACKENDS.items():
        value = config.get(field, readable)
        if value != readable or isinstance(value, bool):
            return (f"{path} names {field} {value!r}: this driver reads megatron-core's torch_dist checkpoints only "
                    f"({', '.join(f'{k} {v!r}' for k, v in READABLE_BACKENDS.items())}); convert the checkpoint "
                    "with the Megatron-LM that wrote it (--ckpt-convert-format torch_dist --ckpt-convert-save DIR), "
                    "or restore the file if it was damaged")
    return None


def _root_and_iteration(iter_dir: str) -> Tuple[str, Optional[int]]:
    """(checkpoint root, iteration) of an iteration directory; None for `release` and other names."""
    root, name = os.path.split(os.path.normpath(iter_dir))
    m = _ITER_DIR.match(name[:12])
    return root, int(m.group(1)) if m else None


def iteration_dirs(root: str) -> List[Tuple[int, str]]:
    """(iteration, directory) of the finished `iter_XXXXXXX` directories of `root`, newest first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in names for m in [_ITER_DIR.match(n)] if m]
    return sorted(found, reverse=True)


# ---------------------------------------------------------------- the tracker

def read_tracker(root: str) -> Tuple[Optional[int], bool]:
    """(iteration, is_release) from the tracker file; (None, False) if absent."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None, False
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text == "release":
        return 0, True
    if text is not None and text.isdigit():
        return int(text), False
    what = "binary data" if text is None else repr(text[:40])
    raise CheckpointError(with_fallback(root, None, f"{path} holds {what}, not an iteration number or 'release'"))


def iteration_to_load(load_dir: str, step: Optional[int] = None) -> Optional[Tuple[str, int, bool]]:
    """(iteration directory, iteration, is_release) to load from `load_dir`:
    iteration `step` (--ckpt-step) when given, else the tracker's; None when
    there is no tracker."""
    if step is not None:
        iter_dir = iteration_dir(load_dir, step)
        if not os.path.isdir(iter_dir):
            there = ", ".join(str(i) for i, _ in iteration_dirs(load_dir)[:8]) or "none"
            raise CheckpointError(f"--ckpt-step {step}: {iter_dir} does not exist (iterations in {load_dir}: {there})")
        return iter_dir, step, False
    iteration, release = read_tracker(load_dir)
    if iteration is None:
        return None
    iter_dir = iteration_dir(load_dir, iteration, release)
    if not os.path.isdir(iter_dir) and os.path.isdir(iter_dir + OLD_SUFFIX):
        return iter_dir + OLD_SUFFIX, iteration, release  # a re-save of it was killed between its two renames
    if not os.path.isdir(iter_dir):
        raise CheckpointError(with_fallback(load_dir, iteration, f"{os.path.join(load_dir, TRACKER_FILENAME)} names "
                                                                 f"iteration {iteration} but {iter_dir} is missing"))
    return iter_dir, iteration, release


def not_a_checkpoint(load_dir: str) -> str:
    """Why `load_dir` holds no checkpoint, and what to do instead (one line)."""
    if not os.path.isdir(load_dir):
        return f"{load_dir} does not exist"
    if os.path.isfile(os.path.join(load_dir, "config.json")):
        return (f"{load_dir} is a Hugging Face model directory, not a Megatron checkpoint: convert it first with "
                f"python tools/checkpoint/util.py --model-type GPT --loader llama2_hf --saver megatron "
                f"--load-dir {load_dir} --save-dir {os.path.normpath(load_dir)}-megatron")
    return (f"{load_dir} has no {TRACKER_FILENAME}: it holds no checkpoint of pretrain_gpt.py or "
            "tools/checkpoint/util.py")


def require_checkpoint(load_dir: Optional[str], needed_by: str) -> None:
    """Fail early, naming `needed_by` (a flag) and the fix, when `load_dir` is no checkpoint."""
    if load_dir is None:
        raise CheckpointError(f"{needed_by} needs --load DIR (the checkpoint to start from)")
    if read_tracker(load_dir)[0] is None:
        raise CheckpointError(f"{needed_by} --load {load_dir}: nothing to load: {not_a_checkpoint(load_dir)}")


# ---------------------------------------------------------------- complete iterations

def incomplete_reason(iter_dir: str) -> Optional[str]:
    """Why `iter_dir` cannot be loaded (a file missing, unreadable or, for
    torch_dist, shorter than its index says), or None when every file of its
    saved layout is there and opens."""
    marker = os.path.join(iter_dir, MARKER_FILE)
    if os.path.isfile(marker):
        try:
            problem = marker_problem(marker)
            if problem:
                return problem
            load_common(iter_dir)
            for info in read_index(os.path.join(iter_dir, METADATA_FILE)).storage_data.values():
                check_size(os.path.join(iter_dir, info.relative_path), info.offset + info.length)
        except (CheckpointError, OSError) as e:
            return first_line(e)
        return None
    ranks = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_")) if os.path.isdir(iter_dir) else []
    layout = None
    for name in ranks:
        path = os.path.join(iter_dir, name, RANK_FILE)
        try:
            layout = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["layout"]
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            return f"{path} does not open ({first_line(e)})"
    if layout is None:
        return f"{iter_dir} holds no mp_rank_* directory"
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    expected = {rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp)}
    missing = sorted(expected - set(ranks))
    return f"{os.path.join(iter_dir, missing[0])} is missing" if missing else None


def last_complete_iteration(root: str, below: Optional[int] = None) -> Optional[Tuple[int, str]]:
    """The newest (iteration, directory) of `root` below `below` whose files
    are all there and open; None when there is none."""
    for iteration, path in iteration_dirs(root):
        if (below is None or iteration < below) and incomplete_reason(path) is None:
            return iteration, path
    return None


def with_fallback(root: str, iteration: Optional[int], problem: str) -> str:
    """`problem` followed by the newest complete iteration of `root` (below
    `iteration`) and how to resume from it, or the news that there is none."""
    found = last_complete_iteration(root, below=iteration)
    if found is None:
        return (f"{problem}. {root} holds no earlier complete checkpoint: restore the file from a copy, "
                "or start without --load")
    k, path = found
    return (f"{problem}. Iteration {k} ({path}) is complete: resume from it with --ckpt-step {k} "
            f"(or write {k} into {os.path.join(root, TRACKER_FILENAME)})")


def read_checkpoint_file(path: str, mmap: bool = True):
    """torch.load(weights_only=True) of a file of an iteration directory
    (`ITER/<rank dir>/<file>`), checked against its recorded checksum when
    there is one; any failure is a CheckpointError naming the file and the
    iteration to use instead."""
    root, iteration = _root_and_iteration(os.path.dirname(os.path.dirname(path)))
    if not os.path.isfile(path):
        raise CheckpointError(with_fallback(root, iteration, f"{path} is missing: the checkpoint is incomplete"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the file cannot be used
        why = ("it holds objects that torch.load(weights_only=True) refuses to unpickle" if "Weights only" in str(e)
               else "the file is truncated or corrupt")
        raise CheckpointError(with_fallback(root, iteration, f"{path} cannot be loaded ({first_line(e)}): {why}"))
    # A structurally sound file can still hold changed bytes (tensor data is read lazily).
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(with_fallback(root, iteration, f"{path}: {problem}"))
    return state


def first_rank_file(iter_dir: str) -> str:
    """The first rank's file of a per-rank (--ckpt-format torch) iteration directory."""
    names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_")) if os.path.isdir(iter_dir) else []
    if not names:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_* directories: the checkpoint is incomplete, "
                              "or not one of this format")
    return os.path.join(iter_dir, names[0], RANK_FILE)


def read_checkpoint_args(load_dir: str, step: Optional[int] = None) -> dict:
    """The flags a checkpoint was saved with (for --use-checkpoint-args), of
    either format; of iteration `step` when given (--ckpt-step). Reads one
    small file and imports no megatron.core, so tools can check a run's
    settings against its checkpoint in a moment (finetune.py does)."""
    chosen = iteration_to_load(load_dir, step)
    if chosen is None:
        raise CheckpointError(not_a_checkpoint(load_dir))
    iter_dir = chosen[0]
    if is_torch_dist(iter_dir):
        return common_args(load_common(iter_dir), iter_dir)
    return read_checkpoint_file(first_rank_file(iter_dir))["args"]


# ---------------------------------------------------------------- publishing and failed saves

def publish_iteration(root: str, staging: str, final_dir: str, iteration: int) -> None:
    """Rename a complete staging directory to `final_dir`, then move the
    tracker to `iteration` (rank 0, after every rank's files are synced)."""
    fsync_dir(staging)
    if os.path.exists(final_dir):
        # Re-saving an iteration: keep the old copy until the new one is in place.
        old = final_dir + OLD_SUFFIX
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(staging, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, final_dir)
    fsync_dir(root)
    atomic_write_text(os.path.join(root, TRACKER_FILENAME), str(iteration))


def agreed_error(error: Optional[str]) -> Optional[str]:
    """The first error any rank met (collective: every rank calls it, with
    None when it met none), so that all ranks stop together instead of some
    waiting forever at the next collective."""
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def save_failed(root: str, iteration: int, error: str) -> CheckpointError:
    """The one-line error of a save that failed (its partial files removed)."""
    try:
        previous, _ = read_tracker(root)
    except CheckpointError:
        previous = None
    kept = f"iteration {previous} is still the latest checkpoint" if previous is not None else "nothing was saved"
    return CheckpointError(f"saving iteration {iteration} to {root} failed: {error}; the partial save was removed "
                           f"and {kept}")


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
