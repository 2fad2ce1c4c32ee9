"""Megatron-LM's distributed checkpoint format (`--ckpt-format torch_dist`),
written and read by megatron-core's `dist_checkpointing`:

    SAVE/latest_checkpointed_iteration.txt     the last complete iteration (moved last)
    SAVE/iter_0000100/metadata.json            {"sharded_backend": "torch_dist", ...}
    SAVE/iter_0000100/common.pt                args, iteration, LR scheduler, content metadata (rank 0)
    SAVE/iter_0000100/.metadata                torch.distributed.checkpoint's index of every shard
    SAVE/iter_0000100/__R_T.distcp             rank R's shards, writer T: model, optimizer, RNG
    SAVE/iter_0000100/checksums.sha256         --ckpt-checksum: the SHA-256 of each file above

Tensors are stored under global names and shapes (every layer of a key
stacked on a leading axis), so a checkpoint loads into any TP / PP / VP / DP
layout, with the optimizer state.

    state.py       the sharded state dict of model, optimizer, scheduler, RNG and counters
    writing.py     what megatron-core's writer processes write through: files hashed as written, write errors kept
    checksums.py   --ckpt-checksum: checksums.sha256 written at publication, verified on load
    save.py        staged, fsynced saves; synchronous or asynchronous; the tracker moves last
    load.py        loads under any layout, says which layout the checkpoint came from
    safe_load.py   megatron-core's load strategies reading through checkpoint/files.py: nothing unpickles code
    full_tensors.py  whole (unsharded) tensors of a checkpoint, layer by layer, for conversion and resharding

Its flags (--async-save, --ckpt-fully-parallel-save/-load, ...) are in checkpoint/flags.py.
"""

import os
import signal
import sys
import threading
import time


def _forget_inherited_writer_queue() -> None:
    """After a fork: drop megatron-core's writer-result queue inherited from the
    parent. It is one queue per process by design; ranks forked from a process
    that had one (a launcher that saved, a test session that converted a
    checkpoint) would share it and could read each other's write results. A
    save in the child makes its own; megatron-core's writer processes get the
    queue they use as an argument, not from this module variable."""
    module = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    if module is not None:
        module._results_queue = None


os.register_at_fork(after_in_child=_forget_inherited_writer_queue)


def serve_writer_results() -> None:
    """Initializer of the process that serves megatron-core's writer-result
    queue (this module is light: the process imports nothing heavy for it).
    A termination signal meant for the training process (torchrun forwards
    SIGTERM to the whole group; --exit-signal-handler then saves) must not end
    the queue that save reports through, so the signals are ignored; the
    process ends with the training process instead (shut down by it, or
    when it is gone)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
