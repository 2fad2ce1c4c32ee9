"""finetune.py's LLaMA-Factory preference keys -> finetune_dpo.py flags, and
the preference flags' checks, each error one line naming the fix (no process
started)."""

import json

import pytest

from megatron.training import finetune_config as fc
from tests.sft.test_finetune_config import REPO, flag, write


@pytest.fixture
def base(tmp_path):
    (tmp_path / "base").mkdir()
    return {"base_model": "base", "dataset_path": "prefs.jsonl", "tokenizer_type": "NullTokenizer", "stage": "dpo"}


def test_stage_dpo_trains_with_finetune_dpo_and_the_pref_keys(tmp_path, base):
    entry = dict(base, pref_loss="ipo", pref_beta=0.5, pref_ftx=0.2)
    plan = fc.make_plan(fc.load_config(write(tmp_path, entry), "run"))
    cmd = fc.train_command(plan, REPO, 100, None)
    assert cmd[1].endswith("finetune_dpo.py")
    assert flag(cmd, "--pref-loss") == "ipo" and flag(cmd, "--pref-beta") == "0.5" and flag(cmd, "--pref-ftx") == "0.2"
    assert flag(cmd, "--ref-load") == plan.base_checkpoint  # full fine-tuning: the reference is named (resumable)
    assert not [f for f in cmd if f.startswith("--sft")]
    config = fc.preprocess_config(plan, "train")
    assert type(config).__name__ == "PreferencePreprocessConfig" and config.seq_length == 2048
    assert config.truncation_mode is None  # over-long pairs refused by default
    cut = fc.make_plan(fc.load_config(write(tmp_path, dict(base, pref_truncation="keep_end")), "run"))
    assert fc.preprocess_config(cut, "train").truncation_mode == "keep_end"

    lora = fc.make_plan(fc.load_config(write(tmp_path, dict(base, lora_r=8)), "run"))
    cmd = fc.train_command(lora, REPO, 100, None)
    assert "--ref-load" not in cmd and flag(cmd, "--lora-rank") == "8"  # reference = the base, adapters off
    assert [flag(c, "--saver") for c in fc.export_commands(lora, REPO)] == ["peft", "hf"]
    simpo = fc.make_plan(fc.load_config(write(tmp_path, dict(base, pref_loss="simpo")), "run"))
    assert "--ref-load" not in fc.train_command(simpo, REPO, 100, None)  # reference-free


def test_shipped_dpo_example_plans_on_a_fresh_clone():
    path = f"{REPO}/finetune_configs.json"
    plan = fc.make_plan(fc.load_config(path, "sentiment_tiny_dpo_r8"))
    assert plan.base_is_hf and plan.cfg["stage"] == "dpo" and json.load(open(path))["sentiment_tiny_dpo_r8"]["lora_r"]
    assert fc.train_command(plan, REPO, 320, 72)[1].endswith("finetune_dpo.py")


@pytest.mark.parametrize("entry,message", [
    ({"stage": "ppo"}, "stage must be sft or dpo"),
    ({"stage": "sft", "pref_beta": 0.2}, "'pref_beta' configures preference tuning: add \"stage\": \"dpo\""),
    ({"stage": "sft", "pref_truncation": "keep_end"}, "'pref_truncation' configures preference tuning"),
    ({"pref_truncation": "left"}, "pref_truncation"),
    ({"packing": True}, "stage dpo keeps one pair per sample"),
])
def test_config_errors_name_the_fix(tmp_path, base, entry, message):
    with pytest.raises(fc.ConfigError, match=message):
        fc.load_config(write(tmp_path, dict(base, **entry)), "run")


DATA = ["--data-path", "d", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--lr", "1e-4", "--train-iters", "1"]


@pytest.mark.parametrize("flags,message", [
    (["--pref-beta", "0"], "--pref-beta 0 must be positive"),
    (["--pref-loss", "ipo", "--dpo-label-smoothing", "0.1"], "applies to sigmoid and simpo"),
    (["--pref-reference", "adapters", "--load", "x", "--finetune"], "add --lora-rank R"),
    (["--pref-reference", "copy", "--load", "x"], "add --ref-load DIR"),
    (["--lora-rank", "4", "--load", "x", "--ref-load", "y"], "does not use: drop it"),
    (["--pref-loss", "simpo", "--pref-reference", "copy"], "has no reference model"),
])
def test_preference_flag_errors_name_the_fix(flags, message):
    from megatron.training import arguments
    from megatron.training.errors import ArgumentError
    from megatron.training.preference.arguments import add_preference_args, validate_preference_args

    args = arguments.parse_args(DATA + flags, add_preference_args)
    with pytest.raises(ArgumentError, match=message):
        validate_preference_args(args)


def test_resolved_reference_sets_the_pipeline_rows():
    from megatron.training import arguments
    from megatron.training.preference.arguments import add_preference_args, validate_preference_args

    rows = {}
    for name, flags in {"copy": ["--load", "x", "--finetune"], "adapters": ["--lora-rank", "4", "--load", "x"],
                        "precomputed": ["--pref-reference", "precomputed", "--ref-load", "x"],
                        None: ["--pref-loss", "simpo"]}.items():
        args = arguments.parse_args(DATA + flags, add_preference_args)
        validate_preference_args(args)
        validate_preference_args(args)  # idempotent: the providers may each call it
        rows[args.pref_reference] = args.sequences_per_sample
    assert rows == {"copy": 4, "adapters": 4, "precomputed": 2, None: 2}


def test_the_log_counts_both_responses_and_the_reference_forward():
    """tokens/s counts the chosen and the rejected response of each pair (the tokens trained on); TFLOP/s
    adds the live reference's forward passes at a third of a training pass."""
    from megatron.training import arguments
    from megatron.training.flops import ModelShape, flops_per_iteration, iteration_work
    from megatron.training.preference.arguments import add_preference_args, validate_preference_args

    shape, batch, seq = ModelShape(2, 64, 128, 4, 2, 16, 256, True), 8, 32
    one = flops_per_iteration(shape, batch, seq)
    args = arguments.parse_args(DATA + ["--load", "x", "--finetune"], add_preference_args)
    validate_preference_args(args)  # a live reference (a frozen copy)
    flops, tokens = iteration_work(shape, batch, seq, args.sequences_per_sample, args.trained_sequences_per_sample)
    assert tokens == 2 * batch * seq and flops == pytest.approx(one * (2 + 2 / 3), rel=1e-12)
    plain = arguments.parse_args(DATA)
    flops, tokens = iteration_work(shape, batch, seq, plain.sequences_per_sample, plain.trained_sequences_per_sample)
    assert tokens == batch * seq and flops == pytest.approx(one, rel=1e-12)
