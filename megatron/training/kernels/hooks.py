"""Where the kernels plug into megatron-core: module-level names it reads at call time.

    CALL_SITES[kernel] = call sites (module, name, {provider: build}): the names
    megatron-core calls, and which provider of the selection puts which of our
    implementations there.

megatron-core calls each of these only when the matching TransformerConfig
fusion is on (apply_rope_fusion, bias_activation_fusion, cross_entropy_loss_fusion
with impl 'native', gradient_accumulation_fusion); selection.py sets those
fields from the same selection. The RMSNorm name is our own norm module's
(models/norms.py), which the local spec builds. The gradient norm and clipping names are
read whenever Transformer Engine and apex are both absent. `install` makes every call site match a
selection: ours where it picks our provider, megatron-core's original
otherwise, so one process can build models with kernels on and off.
"""

import importlib
from typing import Callable, Dict, NamedTuple, Tuple

from megatron.training.kernels.selection import KernelSelection

_MISSING = object()


class CallSite(NamedTuple):
    module: str
    name: str
    builds: Dict[str, Callable[[object], object]]   # the selection's provider key -> (original -> ours)


def _triton_rope(original):
    from megatron.training.kernels.rope import fused_apply_rotary_pos_emb

    return fused_apply_rotary_pos_emb


def _torch_rope(original):
    from megatron.training.kernels.rope_torch import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def _liger_swiglu(original):
    from liger_kernel.megatron.swiglu import LigerMegatronSwiGLU

    # Liger's module has megatron-core's bias_swiglu_impl signature; a bias, fp8
    # input storage or activation offloading go to megatron-core's own function.
    return LigerMegatronSwiGLU(fallback_impl=original)


def _torch_swiglu(original):
    from megatron.training.kernels.swiglu_torch import make_bias_swiglu_impl

    return make_bias_swiglu_impl(original)


def _torch_rmsnorm(original):
    from megatron.training.kernels.rmsnorm_torch import rms_norm

    return rms_norm


def _liger_cross_entropy(original):
    from liger_kernel.megatron.cross_entropy import LigerMegatronCrossEntropy

    loss = LigerMegatronCrossEntropy()

    def liger_vocab_parallel_cross_entropy(vocab_parallel_logits, target, tp_group):
        """megatron-core's fused_vocab_parallel_cross_entropy signature: per-token loss [s, b]."""
        return loss(vocab_parallel_logits, target, tp_group=tp_group)

    return liger_vocab_parallel_cross_entropy


def _addmm_wgrad(original):
    from megatron.training.kernels import grad_accum

    return grad_accum


def _foreach(name):
    def build(original):
        from megatron.training.kernels import multi_tensor

        return getattr(multi_tensor, name)

    return build


CALL_SITES: Dict[str, Tuple[CallSite, ...]] = {
    "rope": (CallSite("megatron.core.models.common.embeddings.rope_utils", "fused_apply_rotary_pos_emb",
                      {"triton": _triton_rope, "torch": _torch_rope}),),
    "swiglu": (CallSite("megatron.core.transformer.mlp", "bias_swiglu_impl", {"liger": _liger_swiglu, "torch": _torch_swiglu}),),
    # Our local spec's norm module (models/norms.py) calls this name.
    "rmsnorm": (CallSite("megatron.training.models.norms", "rms_norm", {"torch": _torch_rmsnorm}),),
    "cross_entropy": (CallSite("megatron.core.models.common.language_module.language_module",
                               "fused_vocab_parallel_cross_entropy", {"liger": _liger_cross_entropy}),),
    "grad_accum": (CallSite("megatron.core.tensor_parallel.layers", "fused_weight_gradient_mlp_cuda",
                            {"addmm": _addmm_wgrad}),),
    "grad_clip": (CallSite("megatron.core.optimizer.clip_grads", "l2_norm_impl",
                           {"foreach": _foreach("multi_tensor_l2norm")}),
                  CallSite("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl",
                           {"foreach": _foreach("multi_tensor_scale")})),
}

_originals: Dict[str, object] = {}
_installed: Dict[Tuple[str, str], object] = {}


def install(selection: KernelSelection) -> None:
    """Point every call site at ours or megatron-core's original, as `selection` says."""
    for kernel, sites in CALL_SITES.items():
        provider = selection.get(kernel)
        for site in sites:
            module = importlib.import_module(site.module)
            key = f"{site.module}.{site.name}"
            if key not in _originals:
                _originals[key] = getattr(module, site.name, _MISSING)
            original = _originals[key]
            if provider in site.builds:
                if (key, provider) not in _installed:
                    _installed[key, provider] = site.builds[provider](None if original is _MISSING else original)
                setattr(module, site.name, _installed[key, provider])
            elif original is _MISSING:
                if hasattr(module, site.name):
                    delattr(module, site.name)
            else:
                setattr(module, site.name, original)
    _set_grad_accum_flag(selection)


def _set_grad_accum_flag(selection: KernelSelection) -> None:
    # megatron-core's linear layers refuse gradient_accumulation_fusion unless
    # this flag (apex's extension imported) is set; the shim stands in for it.
    from megatron.core.tensor_parallel import layers

    key = "megatron.core.tensor_parallel.layers._grad_accum_fusion_available"
    _originals.setdefault(key, layers._grad_accum_fusion_available)
    layers._grad_accum_fusion_available = _originals[key] or selection.get("grad_accum") == "addmm"
