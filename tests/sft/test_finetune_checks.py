"""finetune.py checks a configuration against its base model before any work
(megatron/training/finetune_checks.py): the driver's own validation of the
training command it would run, from the base's config.json or recorded
args; one line, exit status 2, nothing written, in seconds."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron.training import finetune_config as fc
from megatron.training.checkpoint_convert.decoder_configs import megatron_args_from_hf
from megatron.training.finetune_checks import check_before_work
from tests.sft.test_finetune_config import REPO

# SmolLM2-135M's shape (9 heads, 3 query groups, 30 layers, FFN 1536): config.json alone, no weights needed.
SMOL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "tie_word_embeddings": True}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "smol").mkdir()
    (tmp_path / "smol" / "config.json").write_text(json.dumps(SMOL))
    (tmp_path / "train.jsonl").write_text('{"context": "a", "target": "b"}\n')
    return tmp_path


def write_configs(folder, **entries):
    base = {"base_model": "smol", "dataset_path": "train.jsonl"}
    (folder / "configs.json").write_text(json.dumps({name: dict(base, **e) for name, e in entries.items()}))
    return str(folder / "configs.json")


def check(path, name):
    check_before_work(fc.make_plan(fc.load_config(path, name)), REPO, name)


def test_wrong_layout_fails_in_seconds_with_one_line_and_writes_nothing(folder):
    """The issue's case, as a user runs it (a fresh interpreter: its imports count)."""
    configs = write_configs(folder, smol_tp2={"layout": {"tensor_parallel": 2}})
    before = sorted(os.listdir(folder))
    start = time.monotonic()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import finetune; code = finetune.main(sys.argv[2:]); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.core'))); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, REPO, "smol_tp2", "--configs", configs], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: smol_tp2: base_model {folder}/smol: num_query_groups=3 (of 9 attention heads) is not divisible by "
        "layout tensor_parallel (--tensor-model-parallel-size) 2: use a TP size that divides the heads, query "
        "groups and FFN size (1, 3)"]
    assert done.stdout == "[]\n"  # no megatron.core import on the way
    assert sorted(os.listdir(folder)) == before  # no finetune_output/, nothing preprocessed or converted
    print(f"wrong layout reported in {elapsed:.1f} s")
    assert elapsed < 15, elapsed  # ~2.5 s on an idle core; generous for a loaded shared machine


@pytest.mark.parametrize("entry,message", [
    ({"layout": {"pipeline_parallel": 4}},
     r"--num-layers 30 is not divisible by layout pipeline_parallel \(--pipeline-model-parallel-size\) 4: use a PP "
     r"size that divides 30 \(1, 2, 3, 5, 6, 10, 15, 30\)"),
    ({"layout": {"tensor_parallel": 3}, "extra_args": ["--sequence-parallel", "--seq-length", "100"]},
     r"seq_length \(--seq-length\) 100 is not divisible by TP 3"),
    ({"lora_r": 8, "extra_args": ["--bogus-flag"]}, "unknown flag --bogus-flag"),
    ({"stage": "dpo", "pref_reference": "copy", "lora_r": 8},
     r"pref_reference \(--pref-reference\) copy with adapters would keep a second copy of the frozen base"),
])
def test_settings_the_driver_would_refuse(folder, entry, message):
    with pytest.raises(fc.ConfigError, match=message):
        check(write_configs(folder, run=entry), "run")


def test_what_fits_passes_and_config_json_is_read_as_the_converter_reads_it(folder):
    check(write_configs(folder, run={"layout": {"tensor_parallel": 3, "pipeline_parallel": 2, "data_parallel": 2},
                                     "lora_r": 8, "batch_size": 2}), "run")
    (folder / "smol" / "config.json").write_text(json.dumps(dict(SMOL, rope_scaling={"rope_type": "yarn",
                                                                                      "factor": 4.0})))
    with pytest.raises(fc.ConfigError, match="rope scaling of type 'yarn' is not supported"):
        check(write_configs(folder, run={}), "run")


def test_a_megatron_base_is_checked_against_its_recorded_args(folder):
    """A Megatron base (here a checkpoint whose rank file records the args of a converted SmolLM2)."""
    rank_dir = folder / "mg" / "release" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    torch.save({"args": dict(megatron_args_from_hf(SMOL), tokenizer_type="NullTokenizer", vocab_size=49152)},
               rank_dir / "model_optim_rng.pt")
    (folder / "mg" / "latest_checkpointed_iteration.txt").write_text("release")
    configs = write_configs(folder, ok={"base_model": "mg", "layout": {"tensor_parallel": 3}},
                            bad={"base_model": "mg", "layout": {"tensor_parallel": 2}})
    check(configs, "ok")
    with pytest.raises(fc.ConfigError, match=r"num_query_groups=3 \(of 9 attention heads\) is not divisible by layout "
                                             r"tensor_parallel"):
        check(configs, "bad")


def test_one_process_per_gpu(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(fc.ConfigError, match=r"needs 4 processes, one per GPU, and this machine has 2"):
        check(write_configs(folder, run={"layout": {"data_parallel": 4}}), "run")
