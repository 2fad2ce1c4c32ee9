"""Each reroute of megatron/training/cpu_backend.py, checked on its own."""

import logging
import subprocess
import sys

import pytest
import torch

from megatron.training import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend only activates without CUDA")


@pytest.fixture(scope="module", autouse=True)
def active():
    assert cpu_backend.activate() is True
    assert cpu_backend.is_active()


def test_current_device_is_the_cpu():
    t = torch.empty(3, device=torch.cuda.current_device())
    assert t.device.type == "cpu"


def test_cuda_seed_and_state_drive_the_cpu_generator():
    torch.cuda.manual_seed(7)
    a = torch.rand(4)
    torch.manual_seed(7)
    b = torch.rand(4)
    assert torch.equal(a, b)
    state = torch.cuda.get_rng_state()
    x = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), x)


def test_rng_tracker_forks_a_separate_stream_and_restores_the_default_one():
    from megatron.core.tensor_parallel import random as tp_random

    tracker = tp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("stream-a", 1000)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with tracker.fork("stream-a"):
        in_fork = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "the default stream must be restored after a fork"
    torch.manual_seed(1000)
    assert torch.equal(in_fork, torch.rand(4)), "the fork must draw from the stream seeded with 1000"
    tracker.reset()


def test_private_tracker_state_functions_use_the_cpu_generator():
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(3)
    state = tp_random._get_cuda_rng_state()
    x = torch.rand(2)
    tp_random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(2), x)


def test_synchronize_is_a_no_op():
    assert torch.cuda.synchronize() is None


def test_literal_cuda_allocations_land_on_the_cpu():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    scaler = DynamicGradScaler(initial_scale=8.0, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=1, hysteresis=1)
    assert scaler.scale.device.type == "cpu" and float(scaler.scale) == 8.0


def test_proxy_leaves_other_torch_attributes_alone():
    from megatron.core.optimizer import clip_grads

    assert isinstance(clip_grads.torch, cpu_backend._TorchOnCpu)
    assert clip_grads.torch.float32 is torch.float32
    assert clip_grads.torch.zeros(2, device="cpu").device.type == "cpu"


def test_type_names_are_cuda_style_only_inside_the_wrapped_functions():
    t = torch.zeros(1)
    assert t.type() == "torch.FloatTensor"
    with cpu_backend.cuda_type_names():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"


def test_type_check_functions_are_wrapped():
    from megatron.core.optimizer import clip_grads, optimizer

    for fn in (clip_grads.clip_grad_by_total_norm_fp32, optimizer.clip_grad_by_total_norm_fp32,
               optimizer.Float16OptimizerWithFloat16Params.__init__):
        assert getattr(fn, "_cpu_backend_wrapped", False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=10.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.2), atol=1e-6)


def test_cpu_rng_warning_is_filtered():
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                               "CPU RNG state changed within GPU RNG context", (), None)
    assert not all(f.filter(record) for f in logger.filters)


def test_version_mismatch_is_a_clear_error(monkeypatch):
    import megatron.core.package_info as info

    monkeypatch.setattr(info, "__version__", "0.99.0")
    with pytest.raises(cpu_backend.CudaVersionMismatch, match="pip install megatron-core==0.16.1"):
        cpu_backend.check_megatron_core_version()


def test_nothing_changes_when_cuda_is_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "original = torch.cuda.current_device\n"
        "from megatron.training import cpu_backend\n"
        "assert cpu_backend.activate() is False\n"
        "assert torch.cuda.current_device is original\n"
        "import megatron.core.transformer.utils as u\n"
        "assert u.torch is torch\n"
        "print('untouched')\n"
    )
    from tests.distributed.launcher import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout


def test_tensor_cuda_stays_on_cpu_only_inside_the_wrapped_functions():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert getattr(LanguageModule.setup_embeddings_and_output_layer, "_cpu_backend_wrapped", False)
    # the distributed optimizer's gather for torch_dist checkpoints (its all_gather path
    # runs in tests/training/checkpoint/torch_dist/ at TP=2 and DP=2)
    assert getattr(DistributedOptimizer.get_parameter_state_dp_zero, "_cpu_backend_wrapped", False)
    t = torch.ones(2)
    with cpu_backend.tensor_cuda_stays_on_cpu():
        assert t.cuda() is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()  # outside the wrapped function, torch's own error (no CUDA)


def test_sharded_tensors_stay_on_cpu_only_inside_the_broadcast_exchange():
    from megatron.core.dist_checkpointing import ShardedTensor, exchange_utils

    assert getattr(exchange_utils.exchange_loaded_tensors_broadcast, "_cpu_backend_wrapped", False)
    assert isinstance(exchange_utils.torch, cpu_backend._TorchOnCpu)
    t = torch.ones(2)
    with cpu_backend.sharded_tensors_stay_on_cpu():
        assert t.cuda() is t
        sh = ShardedTensor.from_rank_offsets("k", torch.zeros(3)).without_data()
        sh.init_data("cuda")
        assert sh.data.device.type == "cpu" and sh.data.shape == (3,)
    sh = ShardedTensor.from_rank_offsets("k", torch.zeros(3)).without_data()
    with pytest.raises((AssertionError, RuntimeError)):
        sh.init_data("cuda")  # outside, torch's own error (no CUDA)
