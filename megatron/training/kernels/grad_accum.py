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

A main grad marked unwritten (`mark_unwritten`: the grad buffer is zeroed
lazily, training/ddp.py) is overwritten instead (beta=0: the GEMM neither
reads nor keeps what the buffer held) and the mark is cleared; the DDP
backward hook's `add_or_copy` and `zero_if_unwritten` honour the same mark.
"""

import torch

_UNWRITTEN = "_unwritten_this_iteration"


def mark_unwritten(main_grad: torch.Tensor) -> None:
    setattr(main_grad, _UNWRITTEN, True)


def _take_unwritten(main_grad: torch.Tensor) -> bool:
    """Was `main_grad` marked unwritten? Clears the mark (the caller writes it now)."""
    if getattr(main_grad, _UNWRITTEN, False):
        setattr(main_grad, _UNWRITTEN, False)
        return True
    return False


def add_or_copy(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    if _take_unwritten(main_grad):
        main_grad.copy_(grad)
    else:
        main_grad.add_(grad)


def zero_if_unwritten(main_grad: torch.Tensor) -> None:
    if _take_unwritten(main_grad):
        main_grad.zero_()


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    beta = 0 if _take_unwritten(main_grad) else 1
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input, beta=beta)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, beta=beta, out_dtype=main_grad.dtype, out=main_grad)


# apex's names: the fp32 variant accumulates into an fp32 buffer, the fp16 one into a bf16/fp16 buffer.
wgrad_gemm_accum_fp32 = _accumulate
wgrad_gemm_accum_fp16 = _accumulate
