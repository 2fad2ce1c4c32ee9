"""--ckpt-checksum for torch_dist: the SHA-256 of every file of an iteration,
in `ITER/checksums.sha256` (`sha256sum -c` format, as the torch format's
rank directories have theirs), recorded when the save is published and
verified on load.

    ITER/__R_T.distcp     hashed by megatron-core's writer processes as they write it (writing.py)
    ITER/common.pt        hashed by rank 0 right after megatron-core's torch.save wrote it
    ITER/.metadata        hashed by rank 0 when it publishes the save, right after megatron-core's
    ITER/metadata.json    finalization wrote them (small files, read back from the page cache)

SHA-256, as the torch format: the manifest is checked with the same code
and by `sha256sum -c`, and with the SHA extensions of current x86 and ARM
CPUs (OpenSSL uses them) it hashes at least as fast as BLAKE2b
(benchmarks/results/checkpoint_checksum_cpu.md has both, measured).

Verifying reads every file once more: each rank hashes its share of the
files, and all ranks stop with the same one-line error naming the first file
that differs.
"""

import glob
import os
from typing import Dict, Optional

import torch

from megatron.training.checkpoint.files import (
    CHECKSUM_FILE, COMMON_FILE, METADATA_FILE, checksum_problem, read_checksums, sha256_file, write_checksums,
)
from megatron.training.checkpoint.iterations import MARKER_FILE, agreed_error
from megatron.training.checkpoint.torch_dist.writing import DIGEST_SUFFIX
from megatron.training.errors import CheckpointError

DATA_FILES = "*.distcp"
# Files of a torch_dist iteration besides its data files, all of which the manifest must list.
OTHER_FILES = (COMMON_FILE, METADATA_FILE, MARKER_FILE)


def common_digest(staging: str) -> str:
    """The SHA-256 of the staging directory's common.pt (rank 0, once megatron-core has written it)."""
    return sha256_file(os.path.join(staging, COMMON_FILE))


def write_manifest(staging: str, common: str) -> None:
    """checksums.sha256 of a finished save (rank 0, before it is published):
    the writers' digests of the data files (their .sha256 files removed),
    `common` for common.pt, the index and metadata.json hashed now."""
    digests: Dict[str, str] = {COMMON_FILE: common}
    for path in glob.glob(os.path.join(glob.escape(staging), DATA_FILES)):
        try:
            with open(path + DIGEST_SUFFIX, encoding="ascii") as f:
                digests[os.path.basename(path)] = f.read().strip()
        except FileNotFoundError:
            raise CheckpointError(f"{path} has no SHA-256 from the process that wrote it ({path}{DIGEST_SUFFIX}): "
                                  "the checksums cannot be recorded") from None
    for name in (METADATA_FILE, MARKER_FILE):
        digests[name] = sha256_file(os.path.join(staging, name))
    write_checksums(staging, digests)
    for path in glob.glob(os.path.join(glob.escape(staging), DATA_FILES + DIGEST_SUFFIX)):
        os.remove(path)


def _expected_files(iter_dir: str) -> list:
    """The files of the iteration the manifest must cover."""
    data = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(iter_dir), DATA_FILES))]
    return sorted(data + [n for n in OTHER_FILES if os.path.exists(os.path.join(iter_dir, n))])


def _first_problem(iter_dir: str, names: list, recorded: Dict[str, str]) -> Optional[str]:
    for name in names:
        path = os.path.join(iter_dir, name)
        if name not in recorded:
            return (f"{path} is not listed in {os.path.join(iter_dir, CHECKSUM_FILE)}: the checkpoint holds a file "
                    "its save did not write")
        problem = checksum_problem(path, recorded[name])
        if problem:
            return f"{path}: {problem}"
    return None


def verify(iter_dir: str, log=print) -> bool:
    """Compare every file of a torch_dist iteration with checksums.sha256;
    raise a CheckpointError naming the first that differs (or is missing, or
    is not listed). Collective when a process group of several ranks exists
    (each hashes a share of the files). Returns False when the iteration
    records no checksums (nothing verified; said through `log` on rank 0)."""
    recorded = read_checksums(iter_dir)
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if group else (0, 1)
    if not recorded:
        if rank == 0 and log is not None:
            log(f"--ckpt-checksum: {iter_dir} records no checksums (no {CHECKSUM_FILE}: saved without "
                "--ckpt-checksum), so its files are not verified")
        return False
    names = sorted(set(_expected_files(iter_dir)) | set(recorded))
    problem = _first_problem(iter_dir, names[rank::world], recorded)
    if world > 1:
        problem = agreed_error(problem)
    if problem:
        raise CheckpointError(problem)
    return True
