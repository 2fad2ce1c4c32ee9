"""The vLLM backend: the same command uses it when vLLM and a GPU are present
(skipped otherwise), and asking for it without them names the fix."""

import json
import os

import pytest

from megatron.training.distill.teacher import SamplingConfig, TeacherError, build_teacher, vllm_available
from tests.distill.conftest import N_DOCS, build_tiny_llama

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="needs the vllm package and a CUDA GPU "
                                "(pip install vllm on a GPU machine); the transformers backend is tested on CPU")


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed with a GPU here")
def test_vllm_backend_without_vllm_names_the_fix(teacher_dir):
    with pytest.raises(TeacherError, match="--backend hf"):
        build_teacher("vllm", teacher_dir, SamplingConfig())


def test_tensor_parallel_needs_vllm(teacher_dir):
    with pytest.raises(TeacherError, match="needs --backend vllm"):
        build_teacher("hf", teacher_dir, SamplingConfig(), tensor_parallel_size=2)


@pytest.fixture
def gpu_teacher_dir(corpus, tmp_path):
    """A tiny Llama with 64-wide heads, a size every vLLM attention backend supports."""
    return build_tiny_llama(str(tmp_path / "tiny-llama-64"), corpus[0], hidden_size=128, num_heads=2, num_kv_heads=1)


@pytest.mark.gpu
@needs_vllm
def test_same_command_uses_vllm(corpus, gpu_teacher_dir, tmp_path):
    import tools.generate_synthetic_data as tool

    out = tmp_path / "out"
    rc = tool.main(["--input", corpus[0], "--teacher", gpu_teacher_dir, "--output-dir", str(out),
                    "--prefix-length", "16", "--max-new-tokens", "24", "--min-continuation-tokens", "1",
                    "--gpu-memory-utilization", "0.3", "--max-model-len", "512"])
    assert rc == 0
    with open(out / "manifest.jsonl") as f:
        ids = [i for line in f for i in json.loads(line)["ids"]]
    assert sorted(ids) == sorted(f"doc{i}" for i in range(N_DOCS))
    records = [json.loads(line) for name in sorted(os.listdir(out / "shards"))
               for line in open(out / "shards" / name)]
    assert records and {r["backend"] for r in records} == {"vllm"}
    assert all(0 < r["continuation_tokens"] <= 24 for r in records)
