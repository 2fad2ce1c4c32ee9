"""The kernels that talk across tensor-parallel ranks, on TP=2 (gloo, CPU, one launch):

- Liger's vocab-parallel cross-entropy at megatron-core's fused call site,
  each rank holding half the vocabulary, against megatron-core's unfused
  vocab_parallel_cross_entropy and against torch's cross_entropy on the
  whole vocabulary;
- the torch.addmm gradient-accumulation shim inside megatron-core's
  Column/RowParallelLinear (with and without sequence parallelism), against
  the same layers without the fusion.
Plus the cross-entropy at TP=1 (no process group) and, on a GPU, in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.launcher import run_distributed

# fp32: both losses are log(sum exp) - logit in fp32 with another summation
# order, ~1e-6 apart for vocabularies this small; a token scored against the
# wrong shard or a missing all-reduce is off by O(1).
FP32 = dict(rtol=1e-5, atol=1e-6)
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
SEQ, BATCH, VOCAB_PER_RANK, HIDDEN, FFN = 6, 3, 37, 8, 12


def _cross_entropy(rank, logits_full, target):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.language_module import language_module

    tp = parallel_state.get_tensor_model_parallel_group()
    shard = slice(rank * VOCAB_PER_RANK, (rank + 1) * VOCAB_PER_RANK)
    out = {}
    for name, fn in (("liger", lambda x: language_module.fused_vocab_parallel_cross_entropy(x, target, tp)),
                     ("megatron", lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target))):
        logits = logits_full[..., shard].clone().requires_grad_()
        loss = fn(logits)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view_as(loss))  # a non-uniform upstream gradient
        out[name] = (loss.detach(), logits.grad)
    return out


def _linear_grads(rank, sequence_parallel):
    """{layer: (main_grad after the fused backward, the unfused weight grad + the buffer's start value)}."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    out = {}
    row_args = {"input_is_parallel": True, "skip_bias_add": False}
    for name, cls, shape, extra in (("column", ColumnParallelLinear, (HIDDEN, FFN), {"gather_output": False}),
                                    ("row", RowParallelLinear, (FFN, HIDDEN), row_args)):
        layers = []
        for fusion in (True, False):
            config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                                         gradient_accumulation_fusion=fusion, use_cpu_initialization=True)
            torch.manual_seed(7)  # same weights in both layers
            # With fusion, megatron-core raised here unless apex's extension imported.
            layers.append(cls(*shape, config=config, init_method=torch.nn.init.normal_, bias=False, **extra))
        fused, plain = layers
        start = torch.randn(fused.weight.shape)
        fused.weight.main_grad = start.clone()
        torch.manual_seed(100 + rank * sequence_parallel)  # SP: each rank holds its own tokens
        in_features = shape[0] if name == "column" else shape[0] // 2
        tokens = SEQ // 2 if sequence_parallel and name == "column" else SEQ
        x = torch.randn(tokens, BATCH, in_features)
        for layer in (fused, plain):
            y, _ = layer(x)
            torch.manual_seed(200)
            (y * torch.randn(y.shape)).sum().backward()
        out[name] = (fused.weight.main_grad, start + plain.weight.grad)
    return out


def _fusion_refused_without_the_shim() -> str:
    """megatron-core's message when a linear layer asks for the fusion and apex's extension is missing."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=2, gradient_accumulation_fusion=True,
                                 use_cpu_initialization=True)
    try:
        ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=torch.nn.init.normal_, bias=False)
    except RuntimeError as e:
        return str(e)
    return ""


def _worker(rank, world_size):
    from megatron.core import parallel_state
    from megatron.training import cpu_backend
    from megatron.training.kernels import hooks
    from megatron.training.kernels.selection import KernelSelection

    cpu_backend.activate()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    refused = _fusion_refused_without_the_shim()
    hooks.install(KernelSelection({"cross_entropy": "liger", "grad_accum": "addmm"}))
    torch.manual_seed(0)
    logits_full = torch.randn(SEQ, BATCH, 2 * VOCAB_PER_RANK) * 4
    target = torch.randint(0, 2 * VOCAB_PER_RANK, (SEQ, BATCH))
    return {"refused_without_shim": refused, "logits": logits_full, "target": target,
            "ce": _cross_entropy(rank, logits_full, target),
            "linear": _linear_grads(rank, False), "linear_sp": _linear_grads(rank, True)}


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_worker, 2)


def test_vocab_parallel_cross_entropy_matches_megatron_core_and_the_whole_vocabulary(tp2):
    logits = tp2[0]["logits"].clone().requires_grad_()
    target = tp2[0]["target"]
    weights = torch.linspace(0.5, 1.5, target.numel()).view_as(target)
    reference = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), reduction="none").view_as(target)
    reference.backward(weights)
    for rank, result in enumerate(tp2):
        shard = slice(rank * VOCAB_PER_RANK, (rank + 1) * VOCAB_PER_RANK)
        (loss, grad), (mloss, mgrad) = result["ce"]["liger"], result["ce"]["megatron"]
        torch.testing.assert_close(loss, reference.detach(), **FP32)
        torch.testing.assert_close(loss, mloss, **FP32)
        torch.testing.assert_close(grad, logits.grad[..., shard], **FP32)
        torch.testing.assert_close(grad, mgrad, **FP32)


@pytest.mark.parametrize("layout", ["linear", "linear_sp"])
def test_gradient_accumulation_shim_adds_the_weight_gradient_into_main_grad(tp2, layout):
    # Without apex (here) megatron-core refuses the fusion outright; the shim lets it build and run.
    assert "fused_weight_gradient_mlp_cuda module is not found" in tp2[0]["refused_without_shim"]
    for result in tp2:
        for name, (main_grad, expected) in result[layout].items():
            # fp32 GEMMs of the same operands, accumulated in another order.
            torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5, msg=f"{layout} {name}")


def test_cross_entropy_without_a_process_group(call_sites):
    from megatron.core.models.common.language_module import language_module

    call_sites(cross_entropy="liger")
    torch.manual_seed(3)
    logits = (torch.randn(5, 2, 29) * 4).requires_grad_()
    target = torch.randint(0, 29, (5, 2))
    loss = language_module.fused_vocab_parallel_cross_entropy(logits, target, None)
    loss.sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(ref_logits.view(-1, 29), target.view(-1), reduction="none").view(5, 2)
    reference.sum().backward()
    torch.testing.assert_close(loss, reference, **FP32)
    torch.testing.assert_close(logits.grad, ref_logits.grad, **FP32)


@pytest.mark.gpu
@on_gpu
def test_bf16_cross_entropy_and_shim_on_gpu(call_sites):
    from megatron.core.models.common.language_module import language_module
    from megatron.training.kernels import grad_accum

    call_sites(cross_entropy="liger")
    torch.manual_seed(0)
    # 8192 tokens x Llama-3's 128256-row vocabulary, bf16 logits as the output layer gives them.
    logits = (torch.randn(4096, 2, 128256, device="cuda") * 4).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 128256, (4096, 2), device="cuda")
    loss = language_module.fused_vocab_parallel_cross_entropy(logits, target, None)
    loss.sum().backward()
    ref_logits = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(ref_logits.view(-1, 128256), target.view(-1), reduction="none").view(4096, 2)
    reference.sum().backward()
    # Both in fp32 from the same bf16 logits: fp32 summation-order differences only.
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)
    # The gradient is rounded once to bf16: half a bf16 unit (2^-8 relative).
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=2 ** -8, atol=1e-7)

    # Gradient accumulation: bf16 activations and output gradients into an fp32 main grad.
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    main_grad = torch.randn(4096, 2048, device="cuda")
    expected = main_grad + dy.float().t() @ x.float()
    grad_accum.wgrad_gemm_accum_fp32(x, dy, main_grad)
    # One GEMM with fp32 accumulation over 8192 products of bf16 values: fp32 rounding only.
    torch.testing.assert_close(main_grad, expected, rtol=1e-4, atol=1e-2)
