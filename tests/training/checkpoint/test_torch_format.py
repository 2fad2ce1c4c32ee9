"""Checkpoints in the per-rank torch format (--ckpt-format torch): exact resume,
crash safety, weights_only loading, layout checks. The torch_dist format has
its own tests in tests/training/checkpoint/torch_dist/."""

import os
import pickle
import sys

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain

# Dropout on, so a resumed run only matches if the RNG states come back too.
DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
BATCH = ["--micro-batch-size", "2", "--global-batch-size", "8"]
TORCH_FORMAT = ["--ckpt-format", "torch"]


def _argv(extra):
    return TINY_LLAMA + DROPOUT + MOCK_DATA + SCHEDULE + BATCH + TORCH_FORMAT + extra


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path):
    layout = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    straight = run_pretrain(_argv(layout + ["--train-iters", "6"]), world_size=4)
    ckpt = str(tmp_path / "ckpt")
    first = run_pretrain(_argv(layout + ["--train-iters", "6", "--save", ckpt, "--save-interval", "3",
                                         "--exit-interval", "3"]), world_size=4)
    assert [it for it, _, _ in first] == [1, 2, 3]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "3"
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000003"))) == ["mp_rank_00", "mp_rank_01"]
    resumed = run_pretrain(_argv(layout + ["--train-iters", "6", "--load", ckpt]), world_size=4)
    assert [it for it, _, _ in resumed] == [4, 5, 6]
    # Bitwise: same data, weights, optimizer moments, LR schedule and dropout masks.
    assert [(l, g) for _, l, g in resumed] == [(l, g) for _, l, g in straight[3:]]
    assert [(l, g) for _, l, g in first] == [(l, g) for _, l, g in straight[:3]]


def _crash_during_second_save(rank, world_size, argv):
    """Train with --save-interval 2 and die (os._exit) halfway through writing
    the checkpoint of iteration 4."""
    sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training.checkpoint import torch_format

    real_save = torch_format.atomic_torch_save

    def crashing_save(obj, path, *rest):
        if "iter_0000004" in path:
            with open(path + ".tmp-crash", "wb") as f:
                f.write(pickle.dumps(obj)[:100])
            os._exit(17)
        return real_save(obj, path, *rest)

    torch_format.atomic_torch_save = crashing_save
    pretrain_gpt.main(list(argv))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(AssertionError, match="died with exit code 17"):
        run_distributed(_crash_during_second_save, world_size=1,
                        args=(tuple(_argv(["--train-iters", "6", "--save", ckpt, "--save-interval", "2"])),))
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "2"
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004")), "a half-written iteration must not look complete"
    resumed = run_pretrain(_argv(["--train-iters", "6", "--load", ckpt]))
    assert [it for it, _, _ in resumed] == [3, 4, 5, 6]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_load_with_weights_only(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_pretrain(_argv(["--train-iters", "3", "--exit-interval", "1", "--save", ckpt]))
    path = os.path.join(ckpt, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "args", "iteration"} <= set(state)
    state["args"]["evil"] = _Exploit()
    torch.save(state, path)
    with pytest.raises(AssertionError, match="Weights only load failed|UnpicklingError"):
        run_pretrain(_argv(["--train-iters", "3", "--load", ckpt]))
    assert not os.path.exists(os.path.join(ROOT, "pwned"))


def test_resuming_under_another_layout_says_what_to_do(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_pretrain(_argv(["--train-iters", "3", "--exit-interval", "1", "--save", ckpt]))
    with pytest.raises(AssertionError, match=r"another parallel layout \(tensor_model_parallel_size: checkpoint 1 "
                                             r"vs this run 2\).*--finetune.*tools/checkpoint/util.py"):
        run_pretrain(_argv(["--train-iters", "3", "--load", ckpt, "--tensor-model-parallel-size", "2"]),
                     world_size=2)


def test_weights_only_load_under_another_layout_keeps_the_data_position(tmp_path):
    """--no-load-optim --no-load-rng (without --finetune) under a new layout
    takes the weights alone but carries on from the checkpoint's iteration and
    consumed samples, as under the same layout."""
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    run_pretrain(_argv(["--train-iters", "3", "--exit-interval", "1", "--save", ckpt]))
    resumed = run_pretrain(_argv(["--train-iters", "3", "--load", ckpt, "--no-load-optim", "--no-load-rng",
                                  "--tensor-model-parallel-size", "2", "--save", again]), world_size=2)
    assert [it for it, _, _ in resumed] == [2, 3]
    state = torch.load(os.path.join(again, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
    assert state["consumed_train_samples"] == 3 * 8  # global batch 8: 1 step before the checkpoint, 2 after


def test_finetune_in_bf16_trains_on_from_the_loaded_weights(tmp_path):
    """--finetune loads weights without optimizer state; the bf16 optimizer's fp32 main
    parameters must be taken from them, or its first step writes the new run's random
    initialisation (another --seed here) back over the loaded weights."""
    ckpt = str(tmp_path / "ckpt")
    trained = run_pretrain(_argv(["--train-iters", "10", "--lr", "1e-2", "--save", ckpt]))
    go_on = run_pretrain(_argv(["--train-iters", "3", "--load", ckpt, "--finetune", "--bf16", "--seed", "7",
                                "--lr", "1e-9", "--min-lr", "1e-9"]))
    assert trained[-1][1] < trained[0][1] - 1.0, "the checkpoint should have learned something"
    losses = [loss for _, loss, _ in go_on]
    # bf16 rounding of the loaded weights moves the loss by <1%; the random initialisation by >50%.
    assert max(losses) < 1.05 * min(losses) and losses[0] < trained[0][1] - 1.0, losses


def _to_transformer_engine_names(src, out, tp):
    from tools.checkpoint import util

    assert util.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "megatron", "--load-dir", src,
                      "--save-dir", out, "--target-tensor-parallel-size", str(tp),
                      "--saver-transformer-impl", "transformer_engine"]) == 0
    rank0 = os.path.join(out, "iter_0000003", "mp_rank_00", "model_optim_rng.pt")
    names = torch.load(rank0, weights_only=True)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    return out


def test_a_transformer_engine_checkpoint_trains_on_without_transformer_engine(tmp_path):
    """A GPU run with Transformer Engine saves the pre-attention / pre-MLP norms
    under TE's fused names. Loaded here (local spec, no TE), the same layout and
    a resharded one continue exactly as the checkpoint they were written from."""
    ckpt = str(tmp_path / "ckpt")
    run_pretrain(_argv(["--train-iters", "3", "--save", ckpt]))
    go_on = ["--train-iters", "3", "--finetune"]
    expected = run_pretrain(_argv(go_on + ["--load", ckpt]))
    for tp in (1, 2):
        te = _to_transformer_engine_names(ckpt, str(tmp_path / f"te_tp{tp}"), tp)
        assert run_pretrain(_argv(go_on + ["--load", te])) == expected, tp


def test_match_layer_spec_renames_both_ways_and_follows_the_targets_extra_states():
    from megatron.training.sharding import match_layer_spec

    w1, w2, qkv = torch.ones(2), torch.zeros(2), torch.eye(2)
    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": w1,
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": w2,
          "decoder.layers.0.self_attention.linear_qkv.weight": qkv,
          "decoder.layers.0.self_attention.linear_qkv._extra_state": torch.arange(5, dtype=torch.uint8),  # TE >= 1.14
          "decoder.layers.0.self_attention.core_attention._extra_state": torch.ones(3, dtype=torch.uint8)}
    local_names = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
                   "decoder.layers.0.self_attention.linear_qkv.weight",
                   "decoder.layers.0.self_attention.linear_qkv._extra_state",
                   "decoder.layers.0.self_attention.linear_proj._extra_state"]
    local = match_layer_spec(te, local_names)
    assert sorted(local) == sorted(local_names)
    assert local["decoder.layers.0.input_layernorm.weight"] is w1
    assert local["decoder.layers.0.pre_mlp_layernorm.weight"] is w2
    assert local["decoder.layers.0.self_attention.linear_proj._extra_state"] is None  # missing: filled
    back = match_layer_spec(local, [n for n in te if not n.endswith("core_attention._extra_state")])
    assert back["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] is w1
    assert "decoder.layers.0.input_layernorm.weight" not in back
