"""Tiny random HF models shared by the checkpoint tests, built once per session."""

import pytest

from tests.tools.checkpoint.test_conversion import FAMILIES, SHARPEN, make_hf_model


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """{family: HF directory} of the FAMILIES models (Llama 3.x, Qwen2, Qwen3, Mistral)."""
    root = tmp_path_factory.mktemp("families")
    return {name: make_hf_model(root / name, seed=10 + i, sharpen=SHARPEN[name], **config)
            for i, (name, config) in enumerate(FAMILIES.items())}
