"""Adapters (--lora-rank) train on a torch_dist base (the driver's default
format) exactly as on the same base in the torch format: the base goes
through full tensors either way, and the adapter checkpoint is written in
the torch format. The checkpoint tools open such an adapter's torch_dist
base too: its merged export equals the torch copy's, bit for bit, and a
peft adapter imports onto it."""

import os

import torch

from tests.training.lora_runner import TP2, lora_flags, make_base, train_adapter
from tools.checkpoint import util


def test_adapters_on_a_torch_dist_base_train_as_on_its_torch_copy(tmp_path):
    dist_base = make_base(str(tmp_path / "dist_base"), train_iters=3, ckpt_format="torch_dist")
    assert os.path.isfile(os.path.join(dist_base, "iter_0000003", "metadata.json"))
    torch_base = str(tmp_path / "torch_base")  # the same weights, bitwise (tests/tools/checkpoint/)
    assert util.main(["--model-type", "GPT", "--load-dir", dist_base, "--save-dir", torch_base]) == 0
    lora = lora_flags(dora=True)
    on_dist = train_adapter(dist_base, str(tmp_path / "adapter"), lora, world_size=2, layout=TP2)
    on_torch = train_adapter(torch_base, str(tmp_path / "adapter_t"), lora, world_size=2, layout=TP2)
    assert on_dist == on_torch
    assert os.path.isdir(os.path.join(tmp_path, "adapter", "iter_0000003", "mp_rank_00"))  # torch format

    merged = {}
    for name in ("adapter", "adapter_t"):
        out = str(tmp_path / f"merged_{name}")
        assert util.main(["--model-type", "GPT", "--load-dir", str(tmp_path / name), "--save-dir", out,
                          "--merge-adapters"]) == 0
        merged[name] = torch.load(os.path.join(out, "release", "mp_rank_00", "model_optim_rng.pt"),
                                  weights_only=True)["model"]
    assert merged["adapter"].keys() == merged["adapter_t"].keys()
    for key, tensor in merged["adapter_t"].items():
        if torch.is_tensor(tensor):
            assert torch.equal(merged["adapter"][key], tensor), key

    peft_dir, imported = str(tmp_path / "peft"), str(tmp_path / "imported")
    assert util.main(["--model-type", "GPT", "--saver", "peft", "--load-dir", str(tmp_path / "adapter"),
                      "--save-dir", peft_dir]) == 0
    assert util.main(["--model-type", "GPT", "--loader", "peft", "--load-dir", peft_dir, "--base-load-dir", dist_base,
                      "--save-dir", imported]) == 0
    out = torch.load(os.path.join(imported, "release", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
    assert out["adapter_base"] == {"load": os.path.abspath(dist_base), "iteration": 3}
