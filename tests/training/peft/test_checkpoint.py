"""Adapter checkpoints: exact resume, loading under another TP/PP layout, and
one-line errors that name the fix."""

import os
import shutil

import pytest
import torch

from megatron.training.peft.checkpoint import merged_adapter_state
from tests.distributed.launcher import run_distributed
from tests.training.lora_runner import TP2, adapter_argv, lora_flags
from tests.tools.checkpoint.test_conversion import megatron_logits
from tests.training.pretrain_runner import run_pretrain

# Dropout everywhere (the model's and the adapters'), so an exact resume needs the RNG states back.
LORA = lora_flags(dora=True, dropout=0.1)
DROPOUT = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
LAYOUT = TP2 + ["--sequence-parallel"]


def _argv(load, finetune, extra=()):
    return adapter_argv(load, LORA, layout=LAYOUT, iters=6, finetune=finetune, extra=DROPOUT + list(extra))


@pytest.fixture(scope="module")
def runs(base_checkpoint, tmp_path_factory):
    """An uninterrupted 6-step run, and the same run stopped after 3 steps then resumed."""
    save = str(tmp_path_factory.mktemp("resume") / "adapter")
    straight = run_pretrain(_argv(base_checkpoint, True), world_size=2)
    first = run_pretrain(_argv(base_checkpoint, True, ["--save", save, "--save-interval", "3", "--exit-interval", "3"]),
                         world_size=2)
    resumed = run_pretrain(_argv(save, False), world_size=2)
    return straight, first, resumed, save


def test_resumed_adapter_training_reproduces_the_uninterrupted_run_exactly(runs):
    straight, first, resumed, _ = runs
    assert [it for it, _, _ in first] == [1, 2, 3] and [it for it, _, _ in resumed] == [4, 5, 6]
    # Bitwise: same base, adapters, optimizer moments, LR schedule, data position and dropout masks.
    assert [(l, g) for _, l, g in first + resumed] == [(l, g) for _, l, g in straight]


def test_adapter_checkpoint_loads_resharded_under_other_layouts(runs, base_checkpoint):
    """Saved at TP=2 with sequence parallelism; loaded at TP=2, at PP=2 and in one process (the
    second rank a data-parallel replica)."""
    save = runs[3]
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    same, pp2, single, base = megatron_logits(
        [(save, 2, 1, tokens), (save, 1, 2, tokens), (save, 1, 1, tokens), (base_checkpoint, 2, 1, tokens)], 2)
    # fp32: the layouts differ by reduction order only (observed 2e-7); a misplaced shard moves logits by >1e-2.
    torch.testing.assert_close(pp2, same, rtol=0, atol=1e-4)
    torch.testing.assert_close(single, same, rtol=0, atol=1e-4)
    assert (same - base).abs().max() > 1e-3, "the adapters should change the base's logits"


def test_merged_adapter_tensors_have_peft_shapes(runs):
    args, adapter_base, tensors = merged_adapter_state(runs[3])
    assert adapter_base["iteration"] == 3
    hidden, ffn, q, kv, r = 64, 128, 64, 32, 4
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
              "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    assert len(tensors) == 4 * 7 * 3
    for name, tensor in tensors.items():
        module = name.split(".adapter.")[1].split(".")[0]
        out_features, in_features = shapes[module]
        want = {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r),
                "lora_magnitude_vector": (out_features,)}[name.split(f"{module}.")[1]]
        assert tuple(tensor.shape) == want, name


def _error_worker(rank, world_size, cases):
    import pretrain_gpt

    from megatron.training.initialize import destroy

    messages = {}
    for name, argv in cases:
        try:
            pretrain_gpt.main(list(argv))
            messages[name] = None
        except Exception as e:  # noqa: BLE001 - the message is what is tested
            messages[name] = f"{type(e).__name__}: {e}"
        finally:
            destroy()
    return messages


def test_wrong_loads_are_one_line_errors_naming_the_fix(runs, base_checkpoint, tmp_path):
    save = runs[3]
    moved = str(tmp_path / "moved")
    shutil.copytree(save, moved)
    rank_file = os.path.join(moved, "iter_0000003", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(rank_file, map_location="cpu", weights_only=True)
    state["adapter_base"]["load"] = str(tmp_path / "gone")
    torch.save(state, rank_file)
    plain = adapter_argv(base_checkpoint, [], iters=6, finetune=False)
    cases = [
        ("base_without_finetune", adapter_argv(base_checkpoint, LORA, iters=6, finetune=False)),
        ("other_rank", adapter_argv(save, lora_flags(rank=8, dora=True), iters=6, finetune=False)),
        ("no_adapter_flags", plain[: plain.index("--load")] + ["--load", save]),
        ("other_layout", adapter_argv(save, LORA, iters=6, finetune=False)),
        ("base_missing", adapter_argv(moved, LORA, iters=6, finetune=True)),
    ]
    messages = run_distributed(_error_worker, world_size=1, args=(cases,))[0]
    expected = {
        "base_without_finetune": "is a full-model checkpoint: add --finetune",
        "other_rank": "lora_rank: checkpoint 4 vs this run 8",
        "no_adapter_flags": "is an adapter checkpoint",
        "other_layout": "was saved with another parallel layout",
        "base_missing": "which is missing: put that checkpoint back",
    }
    for name, fragment in expected.items():
        assert messages[name] is not None and fragment in messages[name], (name, messages[name])
        assert "\n" not in messages[name], name
    assert "--lora-rank 4" in messages["other_rank"] and "--lora-use-dora" in messages["no_adapter_flags"]
