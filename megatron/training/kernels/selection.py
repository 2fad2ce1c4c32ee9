"""Which implementation runs each fused kernel: flags x capabilities -> `KernelSelection`.

Each kernel has a table of providers in order of preference, each with the
capability it needs. The first provider whose capability holds runs, unless
the kernel's flag turns it off (False). A flag left at its default (None,
or True for Megatron-LM's on-by-default fusions) means "the best provider
available here, else the unfused torch path"; an explicit request that
nothing here can serve is an error that names the fix.

The policy this table encodes: with Transformer Engine installed its kernels
(or megatron-core's own fusions) run, as in Megatron-LM; on CUDA without TE
our Triton RoPE, Liger's SwiGLU and vocab-parallel cross-entropy, the
torch.addmm gradient-accumulation shim, torch's fused AdamW and foreach
gradient clipping run; on a CPU the paths made of plain torch operators run
(RoPE, SwiGLU and RMSNorm as one autograd function each, addmm into fp32 main grads,
torch's fused CPU AdamW, foreach clipping) and the Triton ones only with
FINLLAMA_CPU_KERNELS=1 (tests).
"""

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from megatron.training.errors import ArgumentError
from megatron.training.kernels.capabilities import CPU_KERNELS_ENV, INTERPRETER_ENV, Capabilities

OFF = "off"


class Provider(NamedTuple):
    key: str
    label: str                                          # what the start-up line calls it
    available: Callable[[Capabilities, object], bool]   # (capabilities, args) -> can it run here
    switchable: bool = True                             # False: megatron-core picks it; our flag cannot turn it off
    by_default: Callable[[object], bool] = lambda a: True  # args -> chosen unless another one is named


class Kernel(NamedTuple):
    title: str
    flag: str                                  # args attribute: None/True = on where possible, False = off
    applies: Callable[[object], bool]          # args -> does this model have the operation at all
    providers: Tuple[Provider, ...]
    off_label: str = "unfused"


def _cuda(c, a):
    return c.cuda


def _bf16(a) -> bool:
    return a.params_dtype == torch.bfloat16


def _fp32(a) -> bool:
    return a.params_dtype == torch.float32


def _always(a) -> bool:
    return True


KERNELS: Dict[str, Kernel] = {
    "rope": Kernel("RoPE", "apply_rope_fusion", lambda a: a.position_embedding_type == "rope", (
        Provider("te", "Transformer Engine", lambda c, a: c.transformer_engine and c.cuda),
        Provider("triton", "Triton, ours", lambda c, a: c.triton_runs),
        # Where no kernel runs: the same rotation on torch operators, one autograd function (rope_torch.py).
        Provider("torch", "torch, ours", lambda c, a: True),
    )),
    "swiglu": Kernel("SwiGLU", "bias_swiglu_fusion", lambda a: a.swiglu, (
        # Beside Transformer Engine, megatron-core's own fusion, as in Megatron-LM.
        Provider("jit", "megatron-core jit", lambda c, a: c.transformer_engine and c.cuda),
        Provider("liger", "Liger gate-up, Triton", lambda c, a: c.triton_runs and c.liger),
        Provider("jit", "megatron-core jit", _cuda),
        # Where no kernel runs: one autograd function on torch operators (swiglu_torch.py).
        Provider("torch", "torch, ours", lambda c, a: True),
    )),
    # The local spec's norms (models/norms.py; Transformer Engine's spec has its own). On CUDA torch's
    # RMSNorm is a fused kernel; on a CPU it is a composite of ~18 passes: one autograd function there.
    "rmsnorm": Kernel("RMSNorm", "rmsnorm_fusion",
                      lambda a: a.normalization == "RMSNorm" and a.transformer_impl != "transformer_engine", (
                          Provider("torch", "torch, ours", lambda c, a: not c.cuda),
                      ), off_label="torch.nn.RMSNorm"),
    "gelu": Kernel("bias-GeLU", "bias_gelu_fusion", lambda a: not a.swiglu, (
        Provider("jit", "megatron-core jit", _cuda),
    )),
    "cross_entropy": Kernel("cross-entropy", "cross_entropy_loss_fusion", _always, (
        Provider("te", "Transformer Engine", lambda c, a: c.te_cross_entropy and c.cuda),
        # Provisional order until a GPU measurement (benchmarks/gpu_kernels.py): Liger's
        # H100 figures, 8.0 ms against megatron-core's fused 18.2 ms at 8192 x 131k.
        Provider("liger", "Liger vocab-parallel, Triton", lambda c, a: c.triton_runs and c.liger),
        # megatron-core's fused path returns bf16 gradients whatever the logits'
        # dtype, so it is a default only for bf16 runs.
        Provider("native", "megatron-core fused", _cuda, by_default=_bf16),
    )),
    "grad_accum": Kernel("gradient-accumulation fusion", "gradient_accumulation_fusion", _always, (
        Provider("apex", "apex fused_weight_gradient_mlp_cuda", lambda c, a: c.cuda and c.apex_wgrad),
        # megatron-core's own linears need apex's extension even under the Transformer
        # Engine spec (the output layer is one): the shim stands in for it.
        # fp32 weights into fp32 main grads: addmm_ in place, on any device (a CPU too).
        Provider("addmm", "torch.addmm(out_dtype=fp32) shim", lambda c, a: c.addmm_out_dtype or _fp32(a)),
    ), off_label="off"),
    "adam": Kernel("AdamW", "fused_adam", lambda a: a.optimizer == "adam", (
        # megatron-core imports these instead of torch's AdamW when it can.
        Provider("te", "Transformer Engine FusedAdam", lambda c, a: c.transformer_engine, switchable=False),
        Provider("apex", "apex FusedAdam", lambda c, a: c.apex, switchable=False),
        # torch >= 2.4 has a fused CPU kernel too (transformers' Trainer uses it by default).
        Provider("torch", "torch fused", lambda c, a: c.kernel_device or c.torch_version >= (2, 4)),
    ), off_label="torch foreach"),
    "grad_clip": Kernel("grad-norm clipping", "foreach_grad_clip", lambda a: a.clip_grad > 0, (
        # megatron-core uses these multi-tensor kernels when it can import them.
        Provider("te", "Transformer Engine multi-tensor", lambda c, a: c.transformer_engine, switchable=False),
        Provider("apex", "apex multi-tensor", lambda c, a: c.apex, switchable=False),
        # Else its per-tensor loops: multi_tensor.py's foreach versions instead.
        Provider("foreach", "torch foreach", lambda c, a: True),
    ), off_label="megatron-core per-tensor loop"),
    "masked_softmax": Kernel("masked softmax", "masked_softmax_fusion", _always, (
        Provider("ext", "megatron CUDA extension", lambda c, a: c.cuda and c.masked_softmax_ext),
    ), off_label="off"),
    "bias_dropout": Kernel("bias-dropout", "bias_dropout_fusion", _always, (
        Provider("jit", "megatron-core jit", _cuda),
    ), off_label="off"),
    "persist_layer_norm": Kernel("persistent LayerNorm", "persist_layer_norm", _always, (
        Provider("apex", "apex", lambda c, a: c.cuda and c.apex),
    ), off_label="off"),
}

# Flags that choose one provider by name (Megatron-LM's --cross-entropy-fusion-impl, plus liger).
IMPL_FLAGS = {"cross_entropy": ("cross_entropy_fusion_impl", "--cross-entropy-fusion-impl")}
# Flags that ask for a kernel explicitly (True rather than the default None).
ON_FLAGS = {"cross_entropy": "--cross-entropy-loss-fusion"}


@dataclasses.dataclass(frozen=True)
class KernelSelection:
    """Provider key per kernel (`OFF` when the unfused path runs); kernels the
    model does not have (GeLU in a SwiGLU model) are absent."""

    choices: Dict[str, str]

    def get(self, kernel: str) -> str:
        return self.choices.get(kernel, OFF)

    def runs(self, kernel: str) -> bool:
        return self.get(kernel) != OFF

    def describe(self) -> str:
        """One line naming the path each kernel takes, e.g. 'RoPE: Triton, ours; ...'."""
        parts = []
        for name, key in self.choices.items():
            kernel = KERNELS[name]
            label = kernel.off_label if key == OFF else next(p.label for p in kernel.providers if p.key == key)
            parts.append(f"{kernel.title}: {label}")
        return "; ".join(parts)

    def transformer_config_fields(self, swiglu: bool) -> dict:
        """The megatron-core TransformerConfig fields these choices set."""
        return dict(
            masked_softmax_fusion=self.runs("masked_softmax"),
            bias_activation_fusion=self.runs("swiglu" if swiglu else "gelu"),
            bias_dropout_fusion=self.runs("bias_dropout"),
            apply_rope_fusion=self.runs("rope"),
            persist_layer_norm=self.runs("persist_layer_norm"),
            gradient_accumulation_fusion=self.runs("grad_accum"),
            cross_entropy_loss_fusion=self.runs("cross_entropy"),
            # Liger is plugged in at megatron-core's 'native' call site (see hooks.py).
            cross_entropy_fusion_impl="te" if self.get("cross_entropy") == "te" else "native",
        )


def select(args, caps: Capabilities) -> KernelSelection:
    """The provider of every kernel that applies to the model in `args`."""
    if caps.cpu_kernels and not caps.triton_interpreter:
        raise ArgumentError(f"{CPU_KERNELS_ENV}=1 runs the Triton kernels under Triton's interpreter: also set "
                            f"{INTERPRETER_ENV}=1 before Python starts (Triton reads it when first imported)")
    return KernelSelection({name: _choose(name, kernel, args, caps)
                            for name, kernel in KERNELS.items() if kernel.applies(args)})


def _choose(name: str, kernel: Kernel, args, caps: Capabilities) -> str:
    wanted = getattr(args, kernel.flag, None)
    providers = kernel.providers
    impl_flag: Optional[Tuple[str, str]] = IMPL_FLAGS.get(name)
    impl = getattr(args, impl_flag[0], None) if impl_flag else None
    if impl is not None:
        providers = tuple(p for p in providers if p.key == impl)
    for provider in providers:
        if (provider.available(caps, args) and (impl is not None or provider.by_default(args))
                and (wanted is not False or not provider.switchable)):
            return provider.key
    if wanted is False:
        return OFF
    if impl is not None and (wanted is True or caps.kernel_device):
        raise ArgumentError(f"{impl_flag[1]} {impl} cannot run here ({_needs(name, impl)}): "
                            f"choose another implementation or drop the flag")
    if wanted is True and name in ON_FLAGS:
        raise ArgumentError(f"{ON_FLAGS[name]} needs CUDA (or, for tests, {CPU_KERNELS_ENV}=1 "
                            f"{INTERPRETER_ENV}=1): drop the flag on this machine")
    return OFF


_NEEDS = {
    ("cross_entropy", "te"): "it needs Transformer Engine with parallel_cross_entropy and CUDA",
    ("cross_entropy", "liger"): "it needs liger-kernel, Triton and CUDA",
    ("cross_entropy", "native"): "it needs CUDA",
}


def _needs(name: str, impl: str) -> str:
    return _NEEDS.get((name, impl), "its library or device is missing")
