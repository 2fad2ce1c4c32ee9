"""finetune.py's named configurations -> driver flags (no process started)."""

import json
import os

import pytest

from megatron.training import finetune_config as fc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, entry, name="run"):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({name: entry}))
    return str(path)


@pytest.fixture
def megatron_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    return {"base_model": "base", "dataset_path": "data/train", "tokenizer_type": "NullTokenizer"}


def flag(command, name):
    return command[command.index(name) + 1]


def test_layout_batch_and_epochs_become_driver_flags(tmp_path, megatron_base):
    cfg = fc.load_config(write(tmp_path, dict(
        megatron_base, valid_dataset_path="data/valid", learning_rate=0.01, num_epochs=2.5, batch_size=4,
        gradient_accumulation_steps=2, optimizer="sgd", sgd_momentum=0.8, seq_length=512, packing=True,
        layout={"tensor_parallel": 2, "pipeline_parallel": 2, "data_parallel": 2})), "run")
    assert cfg["base_model"] == str(tmp_path / "base")  # relative to the JSON file
    plan = fc.make_plan(cfg)
    assert not plan.base_is_hf and plan.world_size == 8 and plan.global_batch_size == 16
    assert plan.to_preprocess == {"train": str(tmp_path / "data/train"), "valid": str(tmp_path / "data/valid")}
    cmd = fc.train_command(plan, REPO, train_samples=100, valid_samples=30)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"]
    assert cmd[5].endswith("finetune_gpt.py")
    assert flag(cmd, "--load") == str(tmp_path / "base") and "--finetune" in cmd
    assert flag(cmd, "--global-batch-size") == "16" and flag(cmd, "--micro-batch-size") == "4"
    assert flag(cmd, "--train-iters") == "16"  # ceil(2.5 x 100 / 16)
    assert flag(cmd, "--eval-interval") == "7"  # once per epoch: ceil(100 / 16)
    assert flag(cmd, "--eval-iters") == "2"  # all 30 held-out samples
    assert flag(cmd, "--optimizer") == "sgd" and flag(cmd, "--sgd-momentum") == "0.8"
    assert flag(cmd, "--tensor-model-parallel-size") == "2" and flag(cmd, "--pipeline-model-parallel-size") == "2"
    assert "--sft-packing" in cmd and flag(cmd, "--seq-length") == "512" and flag(cmd, "--lr") == "0.01"
    assert fc.convert_command(plan, REPO) is None  # already a Megatron checkpoint

    # a run with a checkpoint of its own resumes from it instead of starting from the base again
    os.makedirs(plan.checkpoints)
    open(os.path.join(plan.checkpoints, "latest_checkpointed_iteration.txt"), "w").write("3")
    cmd = fc.train_command(plan, REPO, 100, 30)
    assert flag(cmd, "--load") == plan.checkpoints and "--finetune" not in cmd
    assert "--override-opt_param-scheduler" in cmd  # the configuration's schedule, e.g. after more epochs


def test_single_process_and_hf_base(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    plan = fc.make_plan(fc.load_config(write(tmp_path, {"base_model": "hf", "dataset_path": "d.jsonl"}), "run"))
    assert plan.base_is_hf and plan.tokenizer == ["--tokenizer-type", "HuggingFaceTokenizer",
                                                  "--tokenizer-model", str(hf)]
    convert = fc.convert_command(plan, REPO)
    assert flag(convert, "--loader") == "llama2_hf" and flag(convert, "--save-dir") == plan.base_checkpoint
    cmd = fc.train_command(plan, REPO, 10, None)
    assert cmd[1].endswith("finetune_gpt.py") and flag(cmd, "--eval-iters") == "0"
    assert flag(cmd, "--optimizer") == "adam" and "--sgd-momentum" not in cmd


@pytest.mark.parametrize("entry,message", [
    ({"dataset_path": "d"}, "'base_model' is required"),
    ({"base_model": "b", "dataset_path": "d", "learning_rat": 1}, "did you mean learning_rate"),
    ({"base_model": "b", "dataset_path": "d", "quant_bits": 4}, "'quant_bits' configures LoRA adapters: set lora_r"),
    ({"base_model": "b", "dataset_path": "d", "lora_r": 8, "quant_bits": 2}, "quant_bits must be 4 .* or 8"),
    ({"base_model": "b", "dataset_path": "d", "lora_r": 0}, "lora_r must be a positive integer"),
    ({"base_model": "b", "dataset_path": "d", "lora_r": 8, "lora_target_modules": ["q_proj", "qkv_proj"]},
     "lora_target_modules: unknown target module.s. qkv_proj: choose among q_proj, k_proj"),
    ({"base_model": "b", "dataset_path": "d", "layout": {"tp": 2}}, "layout keys are tensor_parallel"),
    ({"base_model": "b", "dataset_path": "d", "optimizer": "adamw"}, "adam or sgd"),
    # types and ranges: each used to be a traceback, or accepted (num_epochs -1 ran one iteration)
    ({"base_model": "b", "dataset_path": "d", "lora_r": 8, "lora_dropout": "0.1"},
     r'lora_dropout must be a number in \[0, 1\), not "0.1" \(a string: write the number without quotes\)'),
    ({"base_model": "b", "dataset_path": "d", "layout": {"tensor_parallel": "two"}},
     r'layout must be an object of tensor_parallel, .* \(integers >= 1\), not {"tensor_parallel": "two"}'),
    ({"base_model": "b", "dataset_path": "d", "batch_size": 0}, "batch_size must be an integer >= 1, not 0"),
    ({"base_model": "b", "dataset_path": "d", "num_epochs": -1}, "num_epochs must be a number > 0, not -1"),
    ({"base_model": "b", "dataset_path": "d", "lora_r": 4.7}, "lora_r must be a positive integer .*, not 4.7"),
    ({"base_model": "b", "dataset_path": "d", "lora_r": 8, "lora_alpha": "16"},
     'lora_alpha must be a number > 0, not "16" \\(a string'),
    ({"base_model": "b", "dataset_path": "d", "learning_rate": "1e-5"}, 'learning_rate must be a number > 0, not "1e-5"'),
    ({"base_model": "b", "dataset_path": "d", "gradient_accumulation_steps": 2.0},
     "gradient_accumulation_steps must be an integer >= 1, not 2.0"),
    ({"base_model": "b", "dataset_path": "d", "packing": "yes"}, 'packing must be true or false, not "yes"'),
    ({"base_model": "b", "dataset_path": "d", "lr_decay_style": "cosin"}, "lr_decay_style must be constant, linear"),
    ({"base_model": "b", "dataset_path": "d", "extra_args": "--bf16"}, "extra_args must be a list"),
])
def test_config_errors_name_the_fix(tmp_path, entry, message):
    with pytest.raises(fc.ConfigError, match=message):
        fc.load_config(write(tmp_path, entry), "run")
    with pytest.raises(fc.ConfigError, match="did you mean run"):
        fc.load_config(write(tmp_path, entry), "rnu")


def test_shipped_examples_parse_and_the_tiny_ones_run_here():
    """Every shipped configuration parses; the FinLoRA-style tiny ones (one of each method) have their
    base model and data in the repository (examples/finlora), so they plan without downloading."""
    path = os.path.join(REPO, "finetune_configs.json")
    methods = set()
    for name in json.load(open(path)):
        cfg = fc.load_config(path, name)
        assert cfg["num_epochs"] > 0
        if name.startswith("sentiment_tiny_"):
            plan = fc.make_plan(cfg)
            assert plan.base_is_hf and os.path.isfile(cfg["dataset_path"]) and plan.world_size == 1
            cmd = fc.train_command(plan, REPO, 100, 10)
            bits = flag(cmd, "--lora-quant-bits") if "--lora-quant-bits" in cmd else None
            methods.add("QLoRA-4bit" if bits == "4" else "DoRA" if "--lora-use-dora" in cmd else
                        "RSLoRA" if "--lora-use-rslora" in cmd else "LoRA")
    assert methods == {"LoRA", "QLoRA-4bit", "DoRA", "RSLoRA"}


def test_finlora_adapter_keys_become_lora_flags_and_exports(tmp_path):
    """FinLoRA's keys (lora_r, lora_alpha, lora_dropout, lora_target_modules,
    quant_bits, peft_use_dora, peft_use_rslora) -> the driver's --lora-* flags;
    the export writes the peft directory, then the merged HF model."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    base = {"base_model": "hf", "dataset_path": "d.jsonl"}
    plan = fc.make_plan(fc.load_config(write(tmp_path, dict(
        base, lora_r=4, quant_bits=4, peft_use_dora=True, lora_target_modules="all-linear")), "run"))
    cmd = fc.train_command(plan, REPO, 10, None)
    assert flag(cmd, "--lora-rank") == "4" and flag(cmd, "--lora-quant-bits") == "4" and "--lora-use-dora" in cmd
    assert flag(cmd, "--lora-alpha") == "16" and flag(cmd, "--lora-dropout") == "0.05"  # FinLoRA's defaults
    assert flag(cmd, "--lora-target-modules") == "all-linear" and "--lora-use-rslora" not in cmd
    peft_export, hf_export = fc.export_commands(plan, REPO)
    assert flag(peft_export, "--saver") == "peft" and flag(peft_export, "--save-dir").endswith("adapter")
    assert flag(peft_export, "--base-model-name-or-path") == str(hf)  # AutoPeftModel finds the base here
    assert flag(hf_export, "--saver") == "hf" and flag(hf_export, "--load-dir") == plan.checkpoints

    plan = fc.make_plan(fc.load_config(write(tmp_path, dict(
        base, lora_r=8, lora_alpha=32, lora_dropout=0.0, quant_bits=16, peft_use_rslora=True, export_hf=False)), "run"))
    cmd = fc.train_command(plan, REPO, 10, None)
    i = cmd.index("--lora-target-modules")
    assert cmd[i + 1:i + 4] == ["q_proj", "k_proj", "v_proj"]  # FinLoRA's default targets
    assert "--lora-quant-bits" not in cmd and "--lora-use-rslora" in cmd and flag(cmd, "--lora-alpha") == "32"
    assert [flag(c, "--saver") for c in fc.export_commands(plan, REPO)] == ["peft"]

    plan = fc.make_plan(fc.load_config(write(tmp_path, base), "run"))  # no lora_r: all weights, no adapter flags
    assert not [f for f in fc.train_command(plan, REPO, 10, None) if f.startswith("--lora")]
    assert [flag(c, "--saver") for c in fc.export_commands(plan, REPO)] == ["hf"]


def test_the_driver_s_lr_decay_styles_are_the_ones_checked():
    from megatron.training.arguments import build_parser

    action = next(a for a in build_parser()._actions if "--lr-decay-style" in a.option_strings)
    assert tuple(action.choices) == fc.LR_DECAY_STYLES


@pytest.mark.parametrize("configs,message", [
    ({"run": {"base_model": "b", "dataset_path": "d.jsonl", "lora_r": 8, "lora_dropout": "0.1"}}, "lora_dropout"),
    ({"run": {"base_model": "b", "dataset_path": "d.jsonl", "layout": {"tensor_parallel": "two"}}}, "layout"),
    ({"run": {"base_model": "b", "dataset_path": "d.jsonl", "batch_size": 0}}, "batch_size"),
    ({"run": {"base_model": "b", "dataset_path": "d.jsonl", "num_epochs": -1}}, "num_epochs"),
    ([{"base_model": "b"}], "holds a JSON list: it must be an object of named configurations"),
    ({"run": ["base_model", "b"]}, "run in .* is a JSON list: it must be an object of keys"),
])
def test_finetune_py_dry_run_answers_a_bad_configuration_in_one_line(tmp_path, capsys, configs, message):
    """finetune.py NAME --configs c.json --dry-run, as a user runs it: one `error:` line, exit status 2,
    and nothing written beside the configuration (no save_dir, no preprocessed data)."""
    import re
    import sys

    sys.path.insert(0, REPO)
    import finetune

    path = tmp_path / "c.json"
    path.write_text(json.dumps(configs))
    capsys.readouterr()
    assert finetune.main(["run", "--configs", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), captured
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == ["c.json"]
