"""tools/checkpoint: peft adapter directories <-> adapter-only checkpoints, and the merged export.

The reference is peft 0.21.2 itself: adapters are built and saved by peft on
tiny random HF Llama models; ours must import them under the adapter
contract's names, write them back bit for bit, merge them exactly as
`merge_and_unload()` does, and refuse keys peft would only warn about.
"""

import json
import os
import shutil

import pytest
import torch

from megatron.training.errors import USER_ERROR_EXIT_CODE as FAILED  # what every entry point returns on a user error

from tests.tools.checkpoint.peft_adapters import (
    BAD_ADAPTER_FILES, HF_MODELS, assert_payload_did_not_run, convert, edit_config, load_hf, make_hf_model,
    make_peft_adapter, safetensors, to_megatron_base,
)

# (name, peft LoraConfig arguments)
ADAPTERS = {
    "dora_all_linear": dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", use_dora=True),
    "rslora_qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
}

# Both sides are fp32 and compute W + (B @ A) * s (and DoRA's row norms) with the
# same formulas; only the blocking of the small matmuls could differ: 1e-6 on
# weights of order 0.1-1. A wrong scaling or a wrong row order is off by > 1e-2.
MERGE_ATOL = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """HF base, our base checkpoint, and each peft adapter (with its PeftModel)."""
    root = tmp_path_factory.mktemp("peft")
    hf = make_hf_model(root / "hf", **HF_MODELS["untied"])
    base = to_megatron_base(hf, root / "base")
    adapters = {name: (str(root / name), make_peft_adapter(hf, root / name, seed=i + 1, **cfg))
                for i, (name, cfg) in enumerate(ADAPTERS.items())}
    return hf, base, adapters


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_import_export_is_bitwise_and_merge_equals_peft(models, name, tmp_path):
    from peft import LoraConfig

    hf, base, adapters = models
    adapter_dir, peft_model = adapters[name]
    imported = tmp_path / "imported"
    assert convert("peft", "megatron", adapter_dir, imported, "--base-load-dir", base,
                   "--target-pipeline-parallel-size", 2) == 0
    state = torch.load(imported / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=True)
    assert state["adapter_base"] == {"load": base, "iteration": 0}
    assert state["args"]["lora_rank"] == ADAPTERS[name]["r"] and state["args"]["lora_use_dora"] == ("dora" in name)
    assert all(".adapter." in k for k in state["model"]), "an adapter-only checkpoint holds adapter tensors only"

    exported = tmp_path / "exported"
    assert convert("megatron", "peft", imported, exported, "--base-model-name-or-path", hf) == 0
    original, written = safetensors(os.path.join(adapter_dir, "adapter_model.safetensors")), safetensors(
        exported / "adapter_model.safetensors")
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    ours, theirs = LoraConfig.from_pretrained(str(exported)), LoraConfig.from_pretrained(adapter_dir)
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "peft_type", "task_type"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert set(ours.target_modules) == {t.rsplit(".", 1)[-1] for t in theirs.target_modules}
    assert ours.base_model_name_or_path == hf

    # merged: from our adapter checkpoint over our base, and from the peft directory over the HF base
    reference, base_weights = _merged_reference(hf, adapter_dir), load_hf(hf).state_dict()
    runs = {"adapter checkpoint over our base": ("megatron", "hf", imported, tmp_path / "merged_ckpt"),
            "peft directory over the HF base": ("peft", "hf", adapter_dir, tmp_path / "merged_peft",
                                                "--base-load-dir", hf)}
    for label, call in runs.items():
        assert convert(*call) == 0, label
        merged = safetensors(call[3] / "model.safetensors")
        assert sorted(merged) == sorted(reference), label
        worst = max((merged[k] - reference[k]).abs().max().item() for k in reference)
        assert worst <= MERGE_ATOL, f"{label}: merged weights differ from merge_and_unload() by {worst}"
    assert any(not torch.equal(reference[k], base_weights[k]) for k in reference), "the adapter changes weights"


def _merged_reference(hf, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(hf), adapter_dir).merge_and_unload().state_dict()


def _edit_weights(edit):
    def apply(adapter_dir):
        from safetensors.torch import save_file

        path = os.path.join(adapter_dir, "adapter_model.safetensors")
        tensors = safetensors(path)
        edit(tensors)
        save_file(tensors, path)
    return apply


MAGNITUDE = "base_model.model.model.layers.3.mlp.down_proj.lora_magnitude_vector"
EXTRA = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
IMPORT_ERRORS = {
    "missing key": (_edit_weights(lambda t: t.pop(MAGNITUDE)),
                    [f"missing key {MAGNITUDE}", "adapter_model.safetensors"]),
    "extra key": (_edit_weights(lambda t: t.update({EXTRA: torch.zeros(4, 32)})),
                  [f"unexpected key {EXTRA}", "adapter_model.safetensors"]),
    "rank of another model": (edit_config(r=8), ["lora_A.weight has shape [4, 32], but with r=8", "needs [8, 32]"]),
    "unsupported bias": (edit_config(bias="all"), ["adapter_config.json: bias='all' is not supported"]),
    "regex targets": (edit_config(target_modules=".*proj"), ["is a regular expression: list the module names"]),
    "unknown target": (edit_config(target_modules=["q_proj", "lm_head"]),
                       ["target_modules: unknown target module(s) lm_head: choose among q_proj, k_proj, v_proj"]),
    **BAD_ADAPTER_FILES,
}


@pytest.mark.parametrize("case", list(IMPORT_ERRORS))
def test_import_errors_name_the_key_and_the_file(models, case, tmp_path, capsys):

    _, base, adapters = models
    broken = tmp_path / "adapter"
    shutil.copytree(adapters["dora_all_linear"][0], broken)
    edit, expected = IMPORT_ERRORS[case]
    edit(str(broken))
    capsys.readouterr()
    assert convert("peft", "megatron", broken, tmp_path / "out", "--base-load-dir", base) == FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines  # one line, the last
    assert all(e in lines[-1] for e in expected) and f"{broken}/" in lines[-1], lines[-1]
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
    if case == "pickle in adapter_model.bin":
        assert_payload_did_not_run(broken)


def test_adapter_commands_refuse_what_they_cannot_do(models, tmp_path, capsys):
    hf, base, adapters = models
    assert convert("peft", "megatron", adapters["rslora_qv"][0], tmp_path / "a") == FAILED
    assert "--loader peft needs --base-load-dir" in capsys.readouterr().err
    assert convert("megatron", "peft", base, tmp_path / "b") == FAILED
    assert "holds no LoRA adapters" in capsys.readouterr().err
    assert convert("peft", "hf", adapters["rslora_qv"][0], tmp_path / "v", "--base-load-dir", hf, "--verify") == FAILED
    assert "--verify runs HF and Megatron models, not a peft directory" in capsys.readouterr().err
    # an adapter-only checkpoint must name one of our checkpoints as its base
    assert convert("peft", "megatron", adapters["rslora_qv"][0], tmp_path / "c", "--base-load-dir", hf) == FAILED
    assert "convert the base first" in capsys.readouterr().err
    # its base gone: the adapter still exports to peft (no base needed), the merged model names what is missing
    shutil.copytree(base, tmp_path / "base_copy")
    assert convert("peft", "megatron", adapters["rslora_qv"][0], tmp_path / "d", "--base-load-dir",
                   tmp_path / "base_copy") == 0
    shutil.rmtree(tmp_path / "base_copy")
    assert convert("megatron", "peft", tmp_path / "d", tmp_path / "e") == 0
    assert convert("megatron", "hf", tmp_path / "d", tmp_path / "f") == FAILED
    err = capsys.readouterr().err
    assert "were trained on the base" in err and "base_copy" in err and "which is missing" in err, err
