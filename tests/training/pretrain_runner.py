"""Run pretrain_gpt.py in-process on N gloo processes and collect its losses."""

import sys

from tests.distributed.launcher import ROOT, run_distributed

# A tiny Llama: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no biases, no dropout.
TINY_LLAMA = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
    "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--make-vocab-size-divisible-by", "64",
]
MOCK_DATA = ["--mock-data", "--vocab-size", "256", "--split", "98,1,1"]
SCHEDULE = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1", "--eval-interval", "1000",
            "--eval-iters", "0", "--seed", "1234"]


def _worker(rank, world_size, argv, entry_point):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import importlib

    from megatron.training.initialize import destroy

    try:
        state = importlib.import_module(entry_point).main(list(argv))
    finally:
        destroy()
    return [(h["iteration"], h["lm loss"], h["grad_norm"]) for h in state.history if "lm loss" in h]


def _sequence_worker(rank, world_size, argvs, entry_point, fields):
    """Several runs in one process group: only the parallel layout is torn down between them."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import importlib

    from megatron.core import parallel_state

    from megatron.training.initialize import destroy

    out = []
    try:
        for argv in argvs:
            try:
                state = importlib.import_module(entry_point).main(list(argv))
            finally:
                parallel_state.destroy_model_parallel()
            out.append([(h["iteration"], *(h[f] for f in fields)) for h in state.history if fields[0] in h])
    finally:
        destroy()
    return out


def run_pretrain_sequence(argvs, world_size=1, entry_point="pretrain_gpt", fields=("lm loss", "grad_norm")):
    """run_pretrain for each argv in turn, in one launch of `world_size` processes
    (one start-up for several runs); per run, [(iteration, *fields)] of the last rank's log."""
    return run_distributed(_sequence_worker, world_size=world_size,
                           args=(tuple(map(tuple, argvs)), entry_point, tuple(fields)))[-1]


def run_pretrain(argv, world_size=1, entry_point="pretrain_gpt"):
    """Losses [(iteration, loss, grad_norm)] logged by the last rank of
    `entry_point.main(argv)` (pretrain_gpt, finetune_gpt)."""
    results = run_distributed(_worker, world_size=world_size, args=(tuple(argv), entry_point))
    return results[-1]
