"""Normalisation for the local (non-Transformer-Engine) layer spec.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism: with it each
TP rank normalises a different slice of the sequence, so the norm weights'
gradients must be summed over the TP group. megatron-core's
`finalize_model_grads` does that for every parameter tagged
`sequence_parallel=True`; this module builds torch's own RMSNorm/LayerNorm
and adds that tag, which is all sequence parallelism needs from a norm.

The RMSNorm is torch's module computing through `rms_norm`, a module-level
name: torch's function unless the kernel selection puts ours there
(kernels/rmsnorm_torch.py, on a CPU; kernels/hooks.py installs it).
"""

import torch

rms_norm = torch.nn.functional.rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameters and state dict) through this module's `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


_NORMS = {"RMSNorm": RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class LocalNorm:
    """Constructor-compatible with megatron-core's norm specs; returns a torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = None):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma needs Transformer Engine or apex norms")
        if config.normalization not in _NORMS:
            raise ValueError(f"--normalization {config.normalization}: choose one of {', '.join(_NORMS)}")
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
