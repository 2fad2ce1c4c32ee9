"""Run a test function on N processes joined by a gloo process group.

    run_distributed(fn, world_size=2, args=(...))

`fn(rank, world_size, *args)` must be a module-level function (it is pickled to
spawned processes). Each process gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
in its environment, as torchrun would set them; what `fn` returns on every rank
comes back as a list indexed by rank. An exception on any rank fails the call
with that rank's traceback.
"""

import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        # Plain pickle bytes: tensors sent as-is would travel as shared-memory
        # handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 600.0):
    # fork: the children inherit the already imported torch and megatron.core
    # (~5 s of imports per process with spawn). Safe here: OMP_NUM_THREADS=1 is set
    # before torch loads (tests/conftest.py), so no thread pool is forked. A CUDA
    # context cannot be forked: once a GPU test in this process has used CUDA, spawn.
    import torch

    forkable = os.environ.get("OMP_NUM_THREADS") == "1" and not torch.cuda.is_initialized()
    ctx = mp.get_context("fork" if forkable else "spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.time() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank {dead[0]}: died with exit code {procs[dead[0]].exitcode}")
                elif time.time() > deadline:
                    errors.append(f"timed out after {timeout} s")
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
