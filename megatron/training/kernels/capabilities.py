"""What this machine can run: the facts the kernel selection is made from.

Every check is a capability (an importable library, a device, a version),
never "are we on a CPU": the same selection runs everywhere and reads these.

FINLLAMA_CPU_KERNELS=1 (on a machine without CUDA) declares the CPU a kernel
device, for tests: Triton kernels then run under Triton's interpreter, which
needs TRITON_INTERPRET=1 from the start (Triton reads it when it is first
imported, and megatron.core imports it; about 2 ms per program instance),
and the optimizer and gradient-accumulation paths use torch's CPU operators.
"""

import dataclasses
import importlib.util
import os
from typing import Tuple

import torch

CPU_KERNELS_ENV = "FINLLAMA_CPU_KERNELS"
INTERPRETER_ENV = "TRITON_INTERPRET"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    cuda: bool
    cpu_kernels: bool          # FINLLAMA_CPU_KERNELS=1 and no CUDA: the CPU counts as a kernel device
    triton_interpreter: bool   # TRITON_INTERPRET=1
    triton: bool
    liger: bool                # liger-kernel (Triton kernels for SwiGLU and the vocab-parallel cross-entropy)
    transformer_engine: bool
    te_cross_entropy: bool     # megatron-core found Transformer Engine's parallel cross-entropy
    apex: bool
    apex_wgrad: bool           # apex's fused_weight_gradient_mlp_cuda extension
    masked_softmax_ext: bool   # megatron's scaled_masked_softmax_cuda extension
    torch_version: Tuple[int, int]

    @property
    def kernel_device(self) -> bool:
        """A device the fused paths run on: CUDA, or the CPU in FINLLAMA_CPU_KERNELS mode."""
        return self.cuda or self.cpu_kernels

    @property
    def triton_runs(self) -> bool:
        return self.triton and self.kernel_device

    @property
    def addmm_out_dtype(self) -> bool:
        """torch.addmm(..., out_dtype=torch.float32) for bf16/fp16 inputs: CUDA, torch >= 2.8."""
        return self.cuda and self.torch_version >= (2, 8)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _te_cross_entropy() -> bool:
    if not _has("transformer_engine"):
        return False
    from megatron.core.models.common.language_module import language_module

    return language_module.te_parallel_cross_entropy is not None


def detect() -> Capabilities:
    """This machine's capabilities. Not cached: FINLLAMA_CPU_KERNELS may be set
    in a forked test process after its parent looked."""
    cuda = torch.cuda.is_available()
    cpu_kernels = not cuda and os.environ.get(CPU_KERNELS_ENV, "") == "1"
    return Capabilities(
        cuda=cuda,
        cpu_kernels=cpu_kernels,
        triton_interpreter=os.environ.get(INTERPRETER_ENV, "") == "1",
        triton=_has("triton"),
        liger=_has("liger_kernel"),
        transformer_engine=_has("transformer_engine"),
        te_cross_entropy=_te_cross_entropy(),
        apex=_has("apex"),
        apex_wgrad=_has("fused_weight_gradient_mlp_cuda"),
        masked_softmax_ext=_has("scaled_masked_softmax_cuda"),
        torch_version=_torch_version(),
    )
