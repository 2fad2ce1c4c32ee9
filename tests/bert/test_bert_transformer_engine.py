"""The Transformer Engine layer specs of the BERT models (post-LN with
separate TE norms; pre-LN with megatron-core's fused TE spec) give
transformers' outputs on a GPU. The same maths runs on CPU with the local
spec in test_bert_hf_parity.py."""

import importlib.util

import pytest
import torch

from tests.bert.conftest import convert
from tests.bert.test_bert_hf_parity import batch_for, hf_outputs
from tests.distributed.launcher import run_distributed

needs_te = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                              reason="needs an NVIDIA GPU and Transformer Engine")


def _worker(rank, world_size, load_dir, batch, kind):
    from megatron.training import inference
    from megatron.training.bert import inference as bert_inference

    args, model = bert_inference.load_bert_model(load_dir, extra_argv=["--transformer-impl", "transformer_engine"])
    out = bert_inference.bert_outputs(args, model, *batch, output=kind).cpu()
    inference.unload()
    return out


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("name", ["bert_pretraining", "megatron_bert_pretraining"])
def test_transformer_engine_spec_matches_transformers(name, hf_models, tmp_path):
    mg = convert("hf", "megatron", hf_models[name], tmp_path / "mg", "--saver-transformer-impl", "transformer_engine")
    batch = batch_for(name)
    reference = hf_outputs(hf_models[name], name, *batch)["lm"]
    torch.backends.cuda.matmul.allow_tf32 = False
    got = run_distributed(_worker, world_size=1, args=(mg, batch, "lm"))[0][..., :reference.shape[-1]]
    # fp32 on GPU with TE's kernels (no TF32): a different summation order, ~1e-6
    assert (got - reference)[batch[1].bool()].abs().max() <= 1e-4
