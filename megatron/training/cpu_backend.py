"""Run megatron-core 0.16.1 on machines without CUDA (gloo backend).

megatron-core is written for GPUs. Its model, schedules, DDP wrapper and
distributed optimizer are device-agnostic apart from a short list of CUDA-only
calls; this module reroutes exactly those, each by name, and nothing else.
`activate()` does nothing when CUDA is available, so GPU runs see the pip
package untouched.

The reroutes (each one has a test in tests/training/test_cpu_backend.py):

1. `torch.cuda.current_device()` returns the CPU device, so the many
   `device=torch.cuda.current_device()` allocations land on the CPU.
2. RNG: `torch.cuda.manual_seed / get_rng_state / set_rng_state` and the
   RNG tracker's private `_get_cuda_rng_state / _set_cuda_rng_state` act on the
   CPU generator. The tracker's forks (tensor-parallel dropout seeds) then swap
   CPU generator states exactly as they swap CUDA ones on GPU.
3. `torch.cuda.synchronize()` is a no-op (there is nothing to wait for).
4. Literal `device="cuda"` allocations in the modules listed in
   `_MODULES_WITH_LITERAL_CUDA`: their module-level `torch` name is replaced by a
   thin proxy whose tensor factories map "cuda" to "cpu". A module-level name is
   used, not a TorchFunctionMode, because a mode is switched off while its own
   handler runs and code executed inside an intercepted call (activation
   recomputation inside autograd) would escape it.
5. Type-string checks (`param.type() == 'torch.cuda.FloatTensor'`) in the
   functions listed in `_FUNCTIONS_WITH_TYPE_CHECKS`: while those functions run,
   `Tensor.type()` reports CPU tensors under their CUDA names.
6. `Tensor.cuda()` in `LanguageModule.setup_embeddings_and_output_layer`
   (tied embeddings with PP > 1) and in `DistributedOptimizer.
   get_parameter_state_dp_zero` (its state gathered for a torch_dist
   checkpoint) leaves the tensor on the CPU while they run.
7. The RNG tracker's warning "CPU RNG state changed within GPU RNG context"
   is filtered: on the CPU the forked stream *is* the CPU generator.
8. dist_checkpointing's broadcast exchange of a fully parallel load
   (`exchange_loaded_tensors_broadcast`) stages every tensor on the GPU: while
   it runs, `Tensor.cuda()` stays on the CPU and `ShardedTensor.init_data`
   allocates CUDA-device data on the CPU (its module's literal `device="cuda"`
   allocations are rerouted as in 4).

The pinned megatron-core version is checked first: if it changes, the list
above must be re-verified, so activation fails with a message saying so.
"""

import contextlib
import functools
import importlib
import logging
import threading

import torch

from megatron.training.errors import UserError

PINNED_MEGATRON_CORE = "0.16.1"

# Modules whose code allocates with a literal device="cuda".
_MODULES_WITH_LITERAL_CUDA = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
)

# (module, qualified attribute) of functions that compare Tensor.type() strings.
# DistributedOptimizer.__init__ covers the checks in the class methods it calls.
_FUNCTIONS_WITH_TYPE_CHECKS = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)

# Functions that move a tensor with Tensor.cuda().
_FUNCTIONS_WITH_TENSOR_CUDA = (
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    # The distributed optimizer's gather of its state for a torch_dist checkpoint
    # (fully reshardable format) moves each shard to the GPU before all_gather.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
)

# Functions that stage sharded tensors on the GPU (Tensor.cuda() and ShardedTensor.init_data("cuda")).
_FUNCTIONS_STAGING_SHARDED_TENSORS = (
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
)

_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")

_active = False
_lock = threading.Lock()


class CudaVersionMismatch(UserError, RuntimeError):
    pass


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _active


def check_megatron_core_version() -> None:
    """The reroutes were verified against one megatron-core release; refuse others."""
    from megatron.core.package_info import __version__

    if __version__ != PINNED_MEGATRON_CORE:
        raise CudaVersionMismatch(
            f"megatron-core {__version__} is installed, but the CPU backend "
            f"(megatron/training/cpu_backend.py) was verified against {PINNED_MEGATRON_CORE}. "
            f"Install the pinned version: pip install megatron-core=={PINNED_MEGATRON_CORE}"
        )


def _cpu_device(device):
    """Map a CUDA device spec to the CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _TorchOnCpu:
    """Stands in for the `torch` module inside one megatron-core module: tensor
    factories given a CUDA device allocate on the CPU; every other attribute is
    torch's own."""

    def __init__(self, real_torch):
        self._torch = real_torch
        for name in _TENSOR_FACTORIES:
            setattr(self, name, self._rerouted(getattr(real_torch, name)))

    @staticmethod
    def _rerouted(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return wrapper

    def __getattr__(self, name):
        return getattr(self._torch, name)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def cuda_type_names():
    """While active, `Tensor.type()` (no arguments) reports CPU float tensors
    under their CUDA names, so megatron-core's dtype dispatch accepts them."""
    real_type = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        result = real_type(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.type = real_type


@contextlib.contextmanager
def tensor_cuda_stays_on_cpu():
    """While active, `Tensor.cuda()` returns the tensor itself."""
    real_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda


@contextlib.contextmanager
def sharded_tensors_stay_on_cpu():
    """While active, `Tensor.cuda()` returns the tensor itself and
    `ShardedTensor.init_data` allocates data for a CUDA device on the CPU."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    real_init_data = ShardedTensor.init_data

    def init_data(self, device, init_fn=torch.empty):
        return real_init_data(self, _cpu_device(device), init_fn)

    ShardedTensor.init_data = init_data
    try:
        with tensor_cuda_stays_on_cpu():
            yield
    finally:
        ShardedTensor.init_data = real_init_data


def _wrapped(fn, context):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    wrapper._cpu_backend_wrapped = True
    return wrapper


def _wrap_functions(table, context):
    for module_name, qualname in table:
        module = importlib.import_module(module_name)
        owner, _, attr = qualname.rpartition(".")
        target = getattr(module, owner) if owner else module
        raw = getattr(target, attr)
        if not getattr(raw, "_cpu_backend_wrapped", False):
            setattr(target, attr, _wrapped(raw, context))


def _patch_torch_cuda():
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda device=None: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a no-op without
    # CUDA), so seed the CPU generator directly rather than through torch.manual_seed.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)

    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state


class _DropCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def activate() -> bool:
    """Install the reroutes when CUDA is absent. Returns True if they are active.

    Idempotent; a no-op (returning False) on machines with CUDA."""
    global _active
    if cuda_available():
        return False
    with _lock:
        if _active:
            return True
        check_megatron_core_version()
        _patch_torch_cuda()
        for module_name in _MODULES_WITH_LITERAL_CUDA:
            module = importlib.import_module(module_name)
            if not isinstance(module.torch, _TorchOnCpu):
                module.torch = _TorchOnCpu(torch)
        _wrap_functions(_FUNCTIONS_WITH_TYPE_CHECKS, cuda_type_names)
        _wrap_functions(_FUNCTIONS_WITH_TENSOR_CUDA, tensor_cuda_stays_on_cpu)
        _wrap_functions(_FUNCTIONS_STAGING_SHARDED_TENSORS, sharded_tensors_stay_on_cpu)
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())
        _active = True
    return True
