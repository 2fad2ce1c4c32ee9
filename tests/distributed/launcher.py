"""Run a test function on N processes joined by a gloo process group.

    run_distributed(fn, world_size=2, args=(...))

`fn(rank, world_size, *args)` must be a module-level function (it is pickled to
spawned processes). Each process gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
in its environment, as torchrun would set them; what `fn` returns on every rank
comes back as a list indexed by rank. An exception on any rank fails the call
with that rank's traceback. The processes are megatron/training/local_launch.py's
(forked: tests/conftest.py sets OMP_NUM_THREADS=1 before torch loads; spawned
once a GPU test in this process has made a CUDA context, which cannot be forked).
"""

from megatron.training.local_launch import ROOT, ProcessesFailed, free_port, run_processes  # noqa: F401


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 600.0):
    try:
        return run_processes(fn, world_size, args, timeout)
    except ProcessesFailed as e:
        raise AssertionError("distributed test failed on " + "\n".join(e.failures)) from None
