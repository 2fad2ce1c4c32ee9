"""Run a function on N processes of this machine joined by a gloo process group.

    results = run_processes(fn, world_size=4, args=(...))   # fn(rank, world_size, *args) on every rank

Each process gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
as torchrun would set them, so the driver's own initialisation joins the
group; what `fn` returns on every rank comes back as a list indexed by rank.
If any rank fails, `ProcessesFailed` lists what went wrong (a UserError raised
by `fn` comes back as itself in `user_error`, so a tool can report it in one
line). Used by --verify (checkpoint_convert/verify.py) and the tests' launcher.

Processes are forked when OMP_NUM_THREADS=1 and this process holds no CUDA
context (the children inherit the imported torch and megatron.core: no ~5 s of
imports each; safe because no OpenMP thread pool exists to be forked, and a
CUDA context cannot be), and spawned otherwise.
"""

import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ProcessesFailed(Exception):
    """`failures`: one text per failed rank (its traceback, its exit code, or a
    timeout); `user_error`: the first UserError a rank raised, if any."""

    def __init__(self, failures: List[str], user_error: Optional[BaseException] = None):
        super().__init__("\n".join(failures))
        self.failures = failures
        self.user_error = user_error


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    # One thread per process, as torchrun's default.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        # Plain pickle bytes: tensors sent as-is would travel as shared-memory
        # handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        from megatron.training.errors import UserError

        try:
            user_error = pickle.dumps(e) if isinstance(e, UserError) else None
        except Exception:  # noqa: BLE001 - an unpicklable error still reports its traceback
            user_error = None
        queue.put((rank, "error", (user_error, traceback.format_exc())))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn, world_size: int, args: tuple = (), timeout: Optional[float] = None) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; their results by rank."""
    import torch
    import torch.multiprocessing as mp

    forkable = os.environ.get("OMP_NUM_THREADS") == "1" and not torch.cuda.is_initialized()
    ctx = mp.get_context("fork" if forkable else "spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, failures, user_error = {}, [], None
    deadline = None if timeout is None else time.time() + timeout
    try:
        while len(results) < world_size and not failures:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    failures.append(f"rank {dead[0]}: died with exit code {procs[dead[0]].exitcode}")
                elif deadline is not None and time.time() > deadline:
                    failures.append(f"timed out after {timeout} s")
                continue
            if status == "error":
                pickled, text = payload
                failures.append(f"rank {rank}:\n{text}")
                user_error = pickle.loads(pickled) if pickled is not None else None
            else:
                results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if failures else timeout)
            if p.is_alive():
                p.kill()
    if failures:
        raise ProcessesFailed(failures, user_error)
    return [results[r] for r in range(world_size)]
