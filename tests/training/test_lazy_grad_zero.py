"""The grad buffer zeroed lazily (megatron/training/ddp.py): the first write of an iteration
overwrites a main grad, so whatever the buffer held before (poisoned here with NaN) never reaches
a gradient. Two data-parallel ranks (all-reduce, and the distributed optimizer's reduce-scatter),
two micro-batches per step (so later micro-batches add onto the first), tied embeddings (the
output layer's fused write plus the embedding's gradient through the hook): the same losses,
gradient norms and main grads as megatron-core's eager zeroing."""

import math
import sys

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA

ARGV = ([a for a in TINY_LLAMA if a != "--untie-embeddings-and-output-weights"] + MOCK_DATA + SCHEDULE
        + ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4"])


def _steps(rank, world_size, lazy, extra):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training import training
    from megatron.training.initialize import destroy

    try:
        args = training.setup_args(list(ARGV) + list(extra))
        tokenizer = training.build_tokenizer_from_args(args)
        model = training.build_model(args, pretrain_gpt.model_provider)
        assert [chunk.lazy_zero for chunk in model] == [True]  # this config takes the lazy path by default
        for chunk in model:
            chunk.lazy_zero = lazy
        optimizer, scheduler = training.build_optimizer(args, model)
        data, _, _ = training.build_data_iterators(args, tokenizer, pretrain_gpt.train_valid_test_datasets_provider, 0)
        params = [p for chunk in model for p in chunk.parameters() if p.requires_grad]
        out = []
        for _ in range(2):
            losses, _, grad_norm = training.train_step(
                args, lambda it, m: pretrain_gpt.forward_step(args, it, m), data, model, optimizer, scheduler)
            out.append((float(losses["lm loss"]), float(grad_norm), [p.main_grad.clone() for p in params]))
            for p in params:
                p.main_grad.fill_(math.nan)  # what a buffer that is not zeroed would carry into the next step
        # No backward at all: every main grad is still unwritten when the gradients are synchronised.
        for chunk in model:
            chunk.zero_grad_buffer()
            chunk.finish_grad_sync()
        untouched = all(bool(torch.all(p.main_grad == 0)) for p in params)
        return out, untouched
    finally:
        destroy()


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"]], ids=["all-reduce", "distributed-optimizer"])
def test_lazy_zeroing_gives_megatron_cores_steps_from_a_poisoned_buffer(extra):
    runs = {lazy: run_distributed(_steps, 2, args=(lazy, extra)) for lazy in (True, False)}
    for rank, ((lazy, lazy_untouched), (eager, eager_untouched)) in enumerate(zip(runs[True], runs[False])):
        assert lazy_untouched and eager_untouched
        for step, ((loss, norm, grads), (ref_loss, ref_norm, ref_grads)) in enumerate(zip(lazy, eager)):
            assert math.isfinite(loss) and math.isfinite(norm), f"rank {rank} step {step}: the poison leaked"
            # The same GEMMs, beta=0 instead of adding to zeros, and a copy instead of an add: equal
            # up to the order of fp32 additions (the tied embedding's two gradients).
            assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-6)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
