"""Train adapters on a tiny Llama base in-process on N gloo processes; shared
by the adapter tests and the adapter export/import tests.

    base = make_base(str(tmp / "base"))                        # a tiny random Llama base checkpoint (one process)
    losses = train_adapter(base, str(tmp / "adapter"), lora_flags(dora=True),
                           world_size=4, layout=TP2_PP2)        # 3 steps at TP=2 x PP=2, saved
    args, adapter_base, tensors = merged_adapter_state(str(tmp / "adapter"))   # peft-shaped, global layer names

The base is TINY_LLAMA (4 layers, hidden 64, 4 heads in 2 query groups,
SwiGLU, RoPE, untied unless tied=True) on mock data.
"""

from typing import List, Optional, Sequence

from megatron.training.peft.checkpoint import merged_adapter_state  # noqa: F401 (re-exported for tests)
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain

BATCH = ["--micro-batch-size", "2", "--global-batch-size", "8"]
LOCAL = ["--transformer-impl", "local"]
TP2 = ["--tensor-model-parallel-size", "2"]
TP2_PP2 = TP2 + ["--pipeline-model-parallel-size", "2"]


def base_model_flags(tied: bool = False) -> List[str]:
    return [a for a in TINY_LLAMA if not (tied and a == "--untie-embeddings-and-output-weights")]


def lora_flags(rank: int = 4, alpha: float = 8, targets: Sequence[str] = ("all-linear",), dora: bool = False,
               rslora: bool = False, quant_bits: Optional[int] = None, dropout: float = 0.0) -> List[str]:
    flags = ["--lora-rank", str(rank), "--lora-alpha", str(alpha), "--lora-dropout", str(dropout),
             "--lora-target-modules", *targets]
    flags += ["--lora-use-dora"] if dora else []
    flags += ["--lora-use-rslora"] if rslora else []
    flags += ["--lora-quant-bits", str(quant_bits)] if quant_bits else []
    return flags


def make_base(path: str, tied: bool = False, train_iters: int = 0, ckpt_format: str = "torch") -> str:
    """A base checkpoint saved by one process: the initial weights, or after `train_iters` full steps; in the
    per-rank torch format by default, whose rank files the tests read (a torch_dist base:
    tests/training/checkpoint/torch_dist/test_adapter_base.py)."""
    run_pretrain(base_model_flags(tied) + MOCK_DATA + SCHEDULE + BATCH + ["--train-iters", str(train_iters),
                                                                         "--save", path, "--ckpt-format", ckpt_format])
    return path


def adapter_argv(load: str, lora: Sequence[str], layout: Sequence[str] = (), iters: int = 3,
                 save: Optional[str] = None, tied: bool = False, finetune: bool = True,
                 extra: Sequence[str] = ()) -> List[str]:
    """Driver flags training adapters on `load` (a base with finetune=True, or an adapter checkpoint)."""
    argv = base_model_flags(tied) + MOCK_DATA + SCHEDULE + BATCH + LOCAL + list(lora) + list(layout) + [
        "--train-iters", str(iters), "--load", load]
    argv += ["--finetune"] if finetune else []
    argv += ["--save", save] if save else []
    return argv + list(extra)


def train_adapter(base: str, save: Optional[str], lora: Sequence[str], world_size: int = 1,
                  layout: Sequence[str] = (), iters: int = 3, tied: bool = False, extra: Sequence[str] = ()):
    """Train new adapters on `base` for `iters` steps (saved to `save` when given); the logged
    [(iteration, loss, grad_norm)]."""
    return run_pretrain(adapter_argv(base, lora, layout, iters, save, tied, extra=extra), world_size)
