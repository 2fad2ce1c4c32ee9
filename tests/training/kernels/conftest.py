import pytest


@pytest.fixture
def call_sites():
    """use(rope="triton", ...) points megatron-core's call sites at our kernels
    for one test; its originals are back afterwards."""
    from megatron.training.kernels import hooks
    from megatron.training.kernels.selection import KernelSelection

    yield lambda **choices: hooks.install(KernelSelection(choices))
    hooks.install(KernelSelection({}))

