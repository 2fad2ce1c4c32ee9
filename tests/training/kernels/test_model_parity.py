"""One training step of a tiny Llama through the real driver with every kernel
on (FINLLAMA_CPU_KERNELS=1: Triton under the interpreter, the addmm shim,
torch's fused AdamW) and with every kernel turned off by its flag: the same
loss, gradient norm and per-parameter gradients. TP=2 with sequence
parallelism, so the vocab-parallel cross-entropy, the gathered
gradient-accumulation inputs and the per-rank heads all take part; half the
rotary channels and position interpolation, so the RoPE kernel's
pass-through and angles do too; two micro-batches, so the gradients
accumulate."""

import contextlib
import io
import os
import sys

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed

MODEL = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "16", "--max-position-embeddings", "16",
    "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--rotary-percent", "0.5", "--rotary-seq-len-interpolation-factor", "2",  # the RoPE kernel's pass-through and PI
    "--use-flash-attn", "--make-vocab-size-divisible-by", "64", "--mock-data", "--vocab-size", "256",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "1",
    "--clip-grad", "1e9", "--eval-iters", "0", "--seed", "1234",
]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
OFF = ["--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-cross-entropy-loss-fusion",
       "--no-gradient-accumulation-fusion", "--no-fused-adam", "--no-rmsnorm-fusion"]


def _one_step(rank, world_size, argv, cpu_kernels):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ["FINLLAMA_CPU_KERNELS"] = "1" if cpu_kernels else "0"
    import pretrain_gpt
    from megatron.training import training
    from megatron.training.initialize import destroy
    from megatron.training.kernels.adam import _torch_adams

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            args = training.setup_args(list(argv))
            tokenizer = training.build_tokenizer_from_args(args)
            model = training.build_model(args, pretrain_gpt.model_provider)
            optimizer, scheduler = training.build_optimizer(args, model)
            data, _, _ = training.build_data_iterators(args, tokenizer,
                                                       pretrain_gpt.train_valid_test_datasets_provider, 0)
            losses, _, grad_norm = training.train_step(
                args, lambda it, m: pretrain_gpt.forward_step(args, it, m), data, model, optimizer, scheduler)
        return {
            "loss": float(losses["lm loss"]), "grad_norm": float(grad_norm),
            # The DDP buffers still hold this step's (reduced) gradients after the optimizer step.
            "grads": {name: p.main_grad.clone() for chunk in model for name, p in chunk.named_parameters()},
            "kernels": [line for line in printed.getvalue().splitlines() if line.startswith("> kernels:")],
            "fused_adam": {g["fused"] for adam in _torch_adams(optimizer) for g in adam.param_groups},
        }
    finally:
        destroy()


@pytest.fixture(scope="module")
def runs():
    return {"on": run_distributed(_one_step, 2, args=(MODEL + TP2, True)),
            "off": run_distributed(_one_step, 2, args=(MODEL + TP2 + OFF, True))}


def test_start_up_line_names_each_kernel_path(runs):
    (on,), (off,) = runs["on"][0]["kernels"], runs["off"][0]["kernels"]  # printed once, by rank 0
    for path in ("RoPE: Triton, ours", "SwiGLU: Liger gate-up, Triton", "cross-entropy: Liger vocab-parallel, Triton",
                 "gradient-accumulation fusion: torch.addmm(out_dtype=fp32) shim", "AdamW: torch fused",
                 "RMSNorm: torch, ours"):
        assert path in on
    for path in ("RoPE: unfused", "SwiGLU: unfused", "cross-entropy: unfused", "gradient-accumulation fusion: off",
                 "AdamW: torch foreach", "RMSNorm: torch.nn.RMSNorm"):
        assert path in off
    assert runs["on"][0]["fused_adam"] == {True} and runs["off"][0]["fused_adam"] == {False}


def test_kernels_on_and_off_give_the_same_step(runs):
    for rank, (on, off) in enumerate(zip(runs["on"], runs["off"])):
        # fp32 throughout: each kernel is ~1e-7 from its unfused twin, and one
        # step through two layers keeps the difference near 1e-6; a kernel bug
        # (a wrong channel, shard or gradient) moves the loss by >1e-3.
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
        assert on["grads"].keys() == off["grads"].keys()
        for name, grad in on["grads"].items():
            torch.testing.assert_close(grad, off["grads"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_kernels_on_and_off_give_the_same_bf16_step_on_gpu():
    argv = MODEL + ["--bf16", "--use-distributed-optimizer"]  # one GPU: TP=1
    (on,), (off,) = (run_distributed(_one_step, 1, args=(argv + flags, False)) for flags in ([], OFF))
    assert "RoPE: unfused" in off["kernels"][0] and "RoPE: unfused" not in on["kernels"][0]
    # bf16 activations: the kernels round once where the unfused path rounds after each
    # operation, a few bf16 units (2^-7) apart per layer; a kernel bug moves the loss by >5%.
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-2)
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=5e-2)
