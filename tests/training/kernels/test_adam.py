"""torch's fused AdamW inside a megatron-core optimizer (torch has a fused CPU
kernel too, so the switch itself is checked here; the driver parity test runs
it inside megatron-core's real optimizer)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from megatron.training.kernels.adam import set_fused_adamw

# fp32: the fused kernel and torch's default loop apply the same update formula
# in another order of operations, ~1e-7 apart after a few steps; a missing bias
# correction or weight decay moves the weights by ~1e-3.
FP32 = dict(rtol=1e-6, atol=1e-6)


def _params(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def _step(adams, seed):
    torch.manual_seed(seed)
    grads = [torch.randn(5, 3), torch.randn(7)]
    for adam in adams:
        for p, g in zip(adam.param_groups[0]["params"], grads):
            p.grad = g.clone()
        adam.step()


def test_fused_adamw_matches_the_default_and_survives_a_state_load():
    fused_params, plain_params = _params(0), _params(0)
    adam = torch.optim.AdamW(fused_params, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1)
    # A megatron-core optimizer holds its torch optimizer as .optimizer; a chained one holds a list of those.
    megatron_optimizer = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])
    assert set_fused_adamw(megatron_optimizer, True) == 1
    assert all(g["fused"] and not g["foreach"] for g in adam.param_groups)
    for seed in range(3):
        _step([adam, plain], seed)
    for p, q in zip(fused_params, plain_params):
        torch.testing.assert_close(p, q, **FP32)

    # A checkpoint of an unfused run carries fused=False in its param groups (torch
    # restores the saved groups' options); this run's choice is applied again.
    adam.load_state_dict(copy.deepcopy(plain.state_dict()))  # as from a file: no shared moments
    assert all(g["fused"] for g in adam.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in adam.state.values())
    _step([adam, plain], 3)
    for p, q in zip(fused_params, plain_params):
        torch.testing.assert_close(p, q, **FP32)


def test_switching_off_restores_torchs_default():
    adam = torch.optim.AdamW(_params(1), lr=1e-2)
    set_fused_adamw(SimpleNamespace(optimizer=adam), True)
    set_fused_adamw(SimpleNamespace(optimizer=adam), False)
    assert all(g["fused"] is False and g["foreach"] is None for g in adam.param_groups)
    assert set_fused_adamw(SimpleNamespace(optimizer=torch.optim.SGD(_params(2), lr=0.1)), True) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fused_adamw_on_gpu_matches_foreach():
    # fp32 main parameters, as megatron-core's mixed-precision optimizers hold them: 16 x 4M.
    torch.manual_seed(0)
    fused = [torch.nn.Parameter(torch.randn(1 << 22, device="cuda")) for _ in range(16)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    adam = torch.optim.AdamW(fused, lr=1e-3, weight_decay=0.1)
    reference = torch.optim.AdamW(plain, lr=1e-3, weight_decay=0.1, foreach=True)
    set_fused_adamw(SimpleNamespace(optimizer=adam), True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in fused]
        for p, q, g in zip(fused, plain, grads):
            p.grad, q.grad = g, g.clone()
        adam.step()
        reference.step()
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, **FP32)
