"""Each fused kernel against the paths it replaces, forward + backward, one GPU:
median milliseconds, peak memory and the error against an fp32 reference.
The cross-entropy rows are the measurement that chooses the default
--cross-entropy-fusion-impl (Liger's, megatron-core's native fusion, or
Transformer Engine's where installed).

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu_kernels_H200.md     # bf16, Llama-3-1B sizes
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --tiny                         # smoke run on a CPU

Sizes (bf16, the 1b config of gpu_throughput.py at micro-batch 2 x sequence
4096): cross-entropy over 8192 tokens x 128256 vocabulary rows, SwiGLU on
[4096, 2, 2 x 8192], RoPE on q and k views of the fused QKV (32 heads / 8
groups of 64 channels), the weight-gradient GEMM of fc1 (8192 tokens, 2048 ->
16384) into an fp32 main grad, AdamW over 0.5B fp32 parameters in 16 tensors.
--tiny shrinks them for Triton's interpreter and leaves out the torch.compile'd
megatron-core fusions (compiling them takes minutes on a CPU).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FULL = dict(tokens=(4096, 2), vocab=128256, ffn=8192, heads=32, groups=8, head_dim=64, hidden=2048,
            adam_params=(16, 2 ** 25))
TINY = dict(tokens=(16, 2), vocab=96, ffn=24, heads=4, groups=2, head_dim=8, hidden=16, adam_params=(4, 1000))


def _time(fn, repeats: int) -> float:
    """Median ms of fn() (forward + backward), after two warm-up calls."""
    cuda = torch.cuda.is_available()
    fn()
    fn()
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _rel_error(got, ref) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).norm() / ref.norm())


def _fwd_bwd(op, x, grad):
    """fn() running op forward and backward on a fresh leaf copy of x; also returns (out, x.grad) once."""
    def fn():
        leaf = x.detach().requires_grad_()
        out = op(leaf)
        out.backward(grad)
        return out, leaf.grad
    return fn


def cross_entropy_rows(size, dtype, device, tiny):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.models.common.language_module import language_module

    s, b = size["tokens"]
    logits = (torch.randn(s, b, size["vocab"], device=device) * 4).to(dtype)
    target = torch.randint(0, size["vocab"], (s, b), device=device)
    grad = torch.ones(s, b, device=device)
    tp = parallel_state.get_tensor_model_parallel_group()
    # megatron-core's unfused path works in place on fp32 logits (bf16 ones it copies to fp32 first).
    impls = {"unfused (megatron-core)": lambda x: tensor_parallel.vocab_parallel_cross_entropy(
        x.clone() if x.dtype == torch.float32 else x, target),
             "liger": lambda x: language_module.fused_vocab_parallel_cross_entropy(x, target, tp)}
    if not tiny:
        impls["native (megatron-core fused)"] = lambda x: fused_vocab_parallel_cross_entropy(x, target, tp)
    if language_module.te_parallel_cross_entropy is not None and torch.cuda.is_available():
        impls["Transformer Engine"] = lambda x: language_module.te_parallel_cross_entropy(x, target, tp, False)
    ref_leaf = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_leaf.view(-1, size["vocab"]), target.view(-1), reduction="none").view(s, b)
    ref.backward(grad)
    return _rows("cross-entropy", impls, logits, grad, ref.detach(), ref_leaf.grad)


def swiglu_rows(size, dtype, device, tiny):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from megatron.core.transformer import mlp

    s, b = size["tokens"]
    x = torch.randn(s, b, 2 * size["ffn"], device=device, dtype=dtype)
    grad = torch.randn(s, b, size["ffn"], device=device, dtype=dtype)

    def unfused(t):
        gate, up = torch.chunk(t, 2, dim=-1)
        return F.silu(gate) * up

    impls = {"unfused": unfused, "liger": lambda t: mlp.bias_swiglu_impl(t, None, False, False)}
    if not tiny:
        impls["megatron-core jit"] = lambda t: bias_swiglu_impl(t, None)
    ref_leaf = x.detach().float().requires_grad_()
    ref = unfused(ref_leaf)
    ref.backward(grad.float())
    return _rows("SwiGLU", impls, x, grad, ref.detach(), ref_leaf.grad)


def rope_rows(size, dtype, device, tiny):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.training.kernels.rope import fused_apply_rotary_pos_emb

    s, b = size["tokens"]
    groups, per_group, d = size["groups"], size["heads"] // size["groups"], size["head_dim"]
    mixed = torch.randn(s, b, groups, (per_group + 2) * d, device=device, dtype=dtype)
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    grad = torch.randn(s, b, size["heads"], d, device=device, dtype=dtype)

    def query(rotate):
        def op(m):
            q = torch.split(m, [per_group * d, d, d], dim=3)[0].reshape(s, b, size["heads"], d)
            return rotate(q, freqs)
        return op

    impls = {"unfused (megatron-core)": query(_apply_rotary_pos_emb_bshd),
             "triton (ours)": query(fused_apply_rotary_pos_emb)}
    ref_leaf = mixed.detach().float().requires_grad_()
    ref = query(_apply_rotary_pos_emb_bshd)(ref_leaf)
    ref.backward(grad.float())
    return _rows("RoPE (q of fused QKV)", impls, mixed, grad, ref.detach(), ref_leaf.grad)


def _rows(kernel, impls, x, grad, ref_out, ref_grad):
    rows = []
    for name, op in impls.items():
        fn = _fwd_bwd(op, x, grad)
        out, x_grad = fn()
        rows.append((kernel, name, _time(fn, 5), _peak_mib(fn),
                     max(_rel_error(out, ref_out), _rel_error(x_grad, ref_grad))))
    return rows


def grad_accum_rows(size, dtype, device, tiny):
    from megatron.training.kernels import grad_accum

    tokens = size["tokens"][0] * size["tokens"][1]
    x = torch.randn(tokens, size["hidden"], device=device, dtype=dtype)
    dy = torch.randn(tokens, 2 * size["ffn"], device=device, dtype=dtype)
    start = torch.randn(2 * size["ffn"], size["hidden"], device=device)
    reference = start + dy.float().t() @ x.float()
    main_grad = start.clone()
    impls = {"matmul, then add (unfused)": lambda: main_grad.add_(dy.t() @ x)}
    if dtype == torch.float32 or torch.cuda.is_available():
        impls["torch.addmm shim"] = lambda: grad_accum.wgrad_gemm_accum_fp32(x, dy, main_grad)
    rows = []
    for name, fn in impls.items():
        main_grad.copy_(start)
        fn()
        err = _rel_error(main_grad - start, reference - start)
        rows.append(("grad-accumulation (fc1 wgrad)", name, _time(fn, 5), _peak_mib(fn), err))
    return rows


def adam_rows(size, dtype, device, tiny):
    count, numel = size["adam_params"]
    rows = []
    results = {}
    for name, fused in (("torch foreach", False), ("torch fused", True)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        adam = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused, foreach=None if fused else True)
        adam.step()
        results[name] = params[0].detach().clone()
        rows.append(("AdamW step", name, _time(adam.step, 5), _peak_mib(adam.step), 0.0))
    err = _rel_error(results["torch fused"], results["torch foreach"])
    rows[-1] = rows[-1][:4] + (err,)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (CPU, Triton's interpreter)")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run on a GPU, or with TRITON_INTERPRET=1 and --tiny for a smoke run")
    size, dtype = (TINY if opts.tiny else FULL), (torch.bfloat16 if cuda else torch.float32)
    device = "cuda" if cuda else "cpu"

    from megatron.core import parallel_state
    from megatron.training import cpu_backend
    from megatron.training.initialize import _free_port

    cpu_backend.activate()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel()
    # Liger's kernels where megatron-core's model calls its fusions (the defining modules keep megatron-core's own).
    from megatron.training.kernels import hooks
    from megatron.training.kernels.selection import KernelSelection

    hooks.install(KernelSelection({"cross_entropy": "liger", "swiglu": "liger"}))
    torch.manual_seed(0)
    rows = []
    for bench in (cross_entropy_rows, swiglu_rows, rope_rows, grad_accum_rows, adam_rows):
        rows += bench(size, dtype, device, opts.tiny)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter; times are not kernel times)"
    lines = [f"# Fused kernels vs the paths they replace, {name}", "",
             f"torch {torch.__version__}, {dtype}, {'tiny' if opts.tiny else 'Llama-3-1B'} sizes; forward + backward, "
             "median ms; peak = memory allocated above the inputs during one call; error = relative L2 "
             "against fp32 on the same inputs (output and input gradient, the larger).", "",
             "| kernel | implementation | ms | peak MiB | rel. error vs fp32 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {k} | {impl} | {ms:.3f} | {'n/a' if peak != peak else f'{peak:.0f}'} | {err:.1e} |"
              for k, impl, ms, peak, err in rows]
    from bench_report import emit

    emit("\n".join(lines) + "\n", opts.out)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
