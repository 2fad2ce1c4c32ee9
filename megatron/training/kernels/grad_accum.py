"""Gradient-accumulation fusion without apex: torch.addmm into the main grads.

megatron-core's linear layers, with gradient_accumulation_fusion, hand each
weight gradient to apex's `fused_weight_gradient_mlp_cuda` extension, which
adds dY^T X straight into the fp32 (or bf16) main-grad buffer instead of
materialising the gradient and adding it later. This module has the two
functions of that extension, on torch:

    main_grad += grad_output^T @ total_input      # [out, in] += [tokens, out]^T [tokens, in]

bf16/fp16 inputs into an fp32 buffer use torch.addmm(..., out_dtype=torch.float32,
out=main_grad) (CUDA, torch >= 2.8: one GEMM, fp32 accumulation, no bf16 copy
of the gradient); inputs of the buffer's own dtype use addmm_ in place
(any device). hooks.py installs this module where megatron-core looks up
the extension.
"""

import torch


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)


# apex's names: the fp32 variant accumulates into an fp32 buffer, the fp16 one into a bf16/fp16 buffer.
wgrad_gemm_accum_fp32 = _accumulate
wgrad_gemm_accum_fp16 = _accumulate
