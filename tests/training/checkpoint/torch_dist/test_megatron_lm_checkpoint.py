"""A checkpoint written by megatron-core's own dist_checkpointing, laid out as
Megatron-LM's save_checkpoint(ckpt_format="torch_dist") lays it out (args
Namespace with Megatron-LM's fields and enums, checkpoint_version,
iteration, model, rng_state as a (PP, TP) ShardedObject of Megatron-LM's
dicts, num_floating_point_operations_so_far, content metadata), for a
GPTModel built with megatron-core's stock local layer spec: it resumes for
training (weights, iteration, consumed samples and RNG states come back
exactly) and evaluates under TP=2 with the writer's logits.

Transformer Engine's spec stores the same names: megatron-core's local spec
maps its norms to TE's fused names in sharded_state_dict() (asserted below).
What only TE writes is extra state: FP8 metadata per linear layer (a uint8
tensor since TE 1.14) and per core attention; the TE variant adds those."""

import argparse
import os
import random

import numpy as np
import torch

from tests.distributed.launcher import run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA

ITERATION, CONSUMED = 7, 56
# fp32 on CPU, TP=2 against one process: reductions in another order; as
# tests/tools/checkpoint/test_conversion.py, 1e-4 is far below what a wrong
# shard or norm gives (>1e-2).
ATOL = 1e-4


def megatron_lm_args():
    """The fields of Megatron-LM's args that matter here, with its types."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, seq_length=32, max_position_embeddings=32, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_position_embedding=True,
        make_vocab_size_divisible_by=64, padded_vocab_size=256, vocab_size=200, tokenizer_type="NullTokenizer",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1, world_size=1, ckpt_format="torch_dist", use_distributed_optimizer=False,
        params_dtype=torch.float32, attention_backend=AttnBackend.auto, consumed_train_samples=CONSUMED,
        iteration=ITERATION, seed=1234)


def megatron_lm_rng_state():
    from megatron.core import tensor_parallel

    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _add_te_extra_states(state, num_layers):
    """What Transformer Engine writes besides: FP8 metadata in every linear
    layer's extra state (a uint8 tensor since TE 1.14) and a core-attention
    extra state per layer (a BytesIO)."""
    import io

    from megatron.core.dist_checkpointing import ShardedObject

    for name, entry in state["model"].items():
        if name.endswith("._extra_state"):
            entry.data = torch.arange(9, dtype=torch.uint8)
    state["te"] = {i: ShardedObject("decoder.layers.self_attention.core_attention._extra_state",
                                    io.BytesIO(b"fp8 meta"), (num_layers,), (i,), replica_id=0)
                   for i in range(num_layers)}


def _write(root, te, tokens):
    """Write the checkpoint with megatron-core's API as Megatron-LM does;
    return its tensor keys, the writer's logits on `tokens`, its weights and
    the RNG states it saved."""
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=256,
                     max_sequence_length=32, share_embeddings_and_output_weights=False, position_embedding_type="rope")
    with torch.no_grad():  # norms away from 1, so a norm loaded into the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    random.seed(11), np.random.seed(12)
    saved_rng = megatron_lm_rng_state()
    state = {"args": megatron_lm_args(), "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": model.sharded_state_dict(metadata=dict(
                 metadata, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))),
             "rng_state": ShardedObject("rng_state", [saved_rng], (1, 1), (0, 0), replica_id=0),
             "num_floating_point_operations_so_far": 1.0e9}
    if te:
        _add_te_extra_states(state, config.num_layers)
    keys = {sh.key for sh in state["model"].values()}
    iter_dir = os.path.join(root, f"iter_{ITERATION:07d}")
    os.makedirs(iter_dir)
    dist_checkpointing.save(state, iter_dir, content_metadata=metadata)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))
    model.eval()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, positions, None).float()
    weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    parallel_state.destroy_model_parallel()
    return keys, logits, weights, saved_rng


def _resume(root, saved_rng):
    """Load the checkpoint for training, as pretrain_gpt.py sets up a run;
    return (iteration, consumed samples), the weights, and whether the RNG
    states came back."""
    from megatron.core import parallel_state

    from megatron.training import training
    from megatron.training.checkpoint import save_load
    from megatron.training.checkpoint.training_state import unwrap
    from megatron.training.models.llama import build_gpt_model

    argv = TINY_LLAMA + MOCK_DATA + SCHEDULE + ["--micro-batch-size", "2", "--train-iters", "10", "--load", root,
                                                "--no-load-optim"]
    args = training.setup_args(argv)
    training.build_tokenizer_from_args(args)
    ours = training.build_model(args, build_gpt_model)
    optimizer, scheduler = training.build_optimizer(args, ours)
    random.seed(0), np.random.seed(0)  # the load must bring the saved states back
    loaded_at = save_load.load_checkpoint(args, ours, optimizer, scheduler)
    restored = {k: v for k, v in unwrap(ours[0]).state_dict().items()
                if isinstance(v, torch.Tensor)}
    rng_back = random.getstate() == saved_rng["random_rng_state"] and all(
        np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved_rng["np_rng_state"]))
    parallel_state.destroy_model_parallel()
    return loaded_at, restored, rng_back


def _refitted_embedding(root):
    """The embedding after a --finetune load into a run that pads the
    vocabulary to 300 rows (--make-vocab-size-divisible-by 100) instead of 256."""
    from megatron.core import parallel_state

    from megatron.training import training
    from megatron.training.checkpoint import save_load
    from megatron.training.checkpoint.training_state import unwrap
    from megatron.training.models.llama import build_gpt_model

    assert TINY_LLAMA[-2:] == ["--make-vocab-size-divisible-by", "64"]
    args = training.setup_args(TINY_LLAMA[:-2] + ["--make-vocab-size-divisible-by", "100"] + MOCK_DATA + SCHEDULE + [
        "--micro-batch-size", "2", "--train-iters", "10", "--load", root, "--finetune"])
    training.build_tokenizer_from_args(args)
    ours = training.build_model(args, build_gpt_model)
    save_load.load_checkpoint(args, ours, *training.build_optimizer(args, ours))
    embedding = unwrap(ours[0]).embedding.word_embeddings.weight.detach().clone()
    parallel_state.destroy_model_parallel()
    return embedding


def _write_and_resume(rank, world_size, roots, tokens):
    from megatron.training import initialize

    initialize.initialize_distributed("gloo")
    out = {}
    for variant, root in roots.items():
        keys, logits, weights, saved_rng = _write(root, variant == "te_extra_state", tokens)
        out[variant] = (keys, logits, weights) + _resume(root, saved_rng)
    return out, _refitted_embedding(roots["local_spec"])


def _evaluate(rank, world_size, roots, tokens):
    from megatron.training import inference

    out = {}
    for variant, root in roots.items():
        args, model = inference.load_model(root, tensor_model_parallel_size=2)
        out[variant] = inference.forward_logits(args, model, tokens)
        inference.unload()
    return out


def test_megatron_lm_checkpoints_resume_and_evaluate(tmp_path):
    roots = {variant: str(tmp_path / variant) for variant in ("local_spec", "te_extra_state")}
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    written, refitted = run_distributed(_write_and_resume, world_size=1, args=(roots, tokens))[0]
    evaluated = run_distributed(_evaluate, world_size=2, args=(roots, tokens))[0]
    for variant, (keys, logits, weights, loaded_at, restored, rng_back) in written.items():
        # megatron-core's local spec stores the norms under Transformer Engine's names
        assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys, variant
        assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys), variant
        assert loaded_at == (ITERATION, CONSUMED), variant
        assert rng_back, variant
        assert sorted(restored) == sorted(weights), variant
        assert all(torch.equal(restored[k], weights[k]) for k in weights), variant
        assert (evaluated[variant] - logits).abs().max().item() <= ATOL, variant
    # Another vocabulary padding (here another --make-vocab-size-divisible-by; in practice another TP):
    # the rows that exist are the checkpoint's, the added padding rows are zeros.
    saved = written["local_spec"][2]["embedding.word_embeddings.weight"]
    assert refitted.shape == (300, 64)
    assert torch.equal(refitted[:256], saved) and not refitted[256:].any()
