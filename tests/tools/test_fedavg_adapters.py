"""tools/fedavg_adapters.py: FedAvg of peft adapters, against Flower's rule written out in numpy."""

import json
import os
import shutil
from functools import reduce

import numpy as np
import pytest
import torch

from megatron.training.errors import USER_ERROR_EXIT_CODE

from tests.tools.checkpoint.peft_adapters import (
    BAD_ADAPTER_FILES, HF_MODELS, assert_payload_did_not_run, load_hf, make_hf_model, make_peft_adapter, safetensors,
)
from tools import fedavg_adapters

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
EXAMPLES = [1200, 800, 400]


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Three DoRA adapters of one base and configuration (different values), and the base."""
    root = tmp_path_factory.mktemp("fedavg")
    hf = make_hf_model(root / "hf", **HF_MODELS["untied"])
    dirs = []
    for k in range(3):
        make_peft_adapter(hf, root / f"client{k}", seed=10 + k, **LORA)
        dirs.append(str(root / f"client{k}"))
    return hf, dirs


def flower_fedavg(arrays_per_client, num_examples):
    """flwr.server.strategy.aggregate.aggregate: sum_k n_k w_k / sum_k n_k per array (numpy, float32)."""
    total = sum(num_examples)
    weighted = [[a * n for a in arrays] for arrays, n in zip(arrays_per_client, num_examples)]
    return [reduce(np.add, layer) / total for layer in zip(*weighted)]


def test_fedavg_matches_flower_and_loads_in_peft(clients, tmp_path, capsys):
    import warnings

    from peft import PeftModel

    hf, dirs = clients
    out = tmp_path / "global"
    assert fedavg_adapters.main(["--adapters", *dirs, "--num-examples", *map(str, EXAMPLES), "--out", str(out)]) == 0
    assert "weight 0.5000" in capsys.readouterr().out  # 1200 / 2400
    inputs = [safetensors(os.path.join(d, "adapter_model.safetensors")) for d in dirs]
    names = sorted(inputs[0])
    expected = flower_fedavg([[t[n].numpy() for n in names] for t in inputs], EXAMPLES)
    got = safetensors(out / "adapter_model.safetensors")
    assert sorted(got) == names and any("lora_magnitude_vector" in n for n in names)
    for name, ref in zip(names, expected):
        # float64 sums cast to float32 vs Flower's float32 sums: a few ulp of values of order 1
        assert torch.allclose(got[name], torch.from_numpy(ref), rtol=1e-6, atol=1e-7), name
        assert not torch.equal(got[name], inputs[0][name])
    with open(out / "adapter_config.json") as f, open(os.path.join(dirs[0], "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_hf(hf), str(out))
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    loaded = model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(loaded.lora_B["default"].weight,
                       got["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])


def _rewrite_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return str(dst)


def test_fedavg_refuses_adapters_of_another_base_or_config(clients, tmp_path, capsys):
    hf, dirs = clients
    other_base = _rewrite_config(dirs[1], tmp_path / "other_base", base_model_name_or_path="/models/another")
    other_alpha = _rewrite_config(dirs[1], tmp_path / "other_alpha", lora_alpha=32)
    cases = [
        ([dirs[0], other_base], EXAMPLES[:2], "has base_model_name_or_path='/models/another'"),
        ([dirs[0], other_alpha], EXAMPLES[:2], "lora_alpha=32"),
        (dirs, EXAMPLES[:2], "--num-examples has 2 values for 3 adapters"),
        (dirs[:2], [5, 0], "every count must be positive"),
    ]
    for adapters, counts, message in cases:
        out = tmp_path / "out"
        assert fedavg_adapters.main(["--adapters", *adapters, "--num-examples", *map(str, counts),
                                     "--out", str(out)]) == USER_ERROR_EXIT_CODE
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("case", list(BAD_ADAPTER_FILES))
def test_a_bad_adapter_file_is_one_error_line(clients, tmp_path, capsys, case):
    """Each bad file (the second adapter's) is one `error:` line naming it; nothing is written, nothing unpickled runs."""
    _, dirs = clients
    broken = tmp_path / "broken"
    shutil.copytree(dirs[1], broken)
    edit, expected = BAD_ADAPTER_FILES[case]
    edit(str(broken))
    out = tmp_path / "out"
    capsys.readouterr()
    assert fedavg_adapters.main(["--adapters", dirs[0], str(broken), "--num-examples", "3", "1",
                                 "--out", str(out)]) == USER_ERROR_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}/"), lines
    assert all(e in lines[0] for e in expected), lines[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    if case == "pickle in adapter_model.bin":
        assert_payload_did_not_run(broken)
