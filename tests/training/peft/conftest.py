"""Shared fixtures of the adapter tests: tiny Llama base checkpoints, saved once per session."""

import pytest

from tests.training.lora_runner import make_base


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """TINY_LLAMA (untied embeddings) as saved by one process, trained 3 steps so its weights are not the
    initialisation's."""
    return make_base(str(tmp_path_factory.mktemp("lora_base") / "base"), train_iters=3)
