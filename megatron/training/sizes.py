"""Small numeric helpers that flags, checkpoints, converters and the planner
all need. A leaf: imports nothing of this project."""

import math


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the embedding rows are a multiple of
    make_vocab_size_divisible_by x TP, so every TP shard has the same size."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default --ffn-hidden-size: 4h, or 2/3 of that (rounded
    down to a multiple of 64) with SwiGLU, which keeps the MLP's parameter count."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


def divisors(n: int) -> str:
    """The divisors of `n`, listed ("1, 2, 4, 8") for error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def tensor_parallel_sizes(heads: int, groups: int, ffn_hidden_size: int) -> str:
    """The TP sizes a model can be split over, listed: the common divisors of
    its attention heads, query groups and FFN size."""
    return divisors(math.gcd(heads, groups, ffn_hidden_size))
