"""Adapters (--lora-rank) train on a torch_dist base (the driver's default
format) exactly as on the same base in the torch format: the base goes
through full tensors either way, and the adapter checkpoint is written in
the torch format."""

import os

from tests.training.lora_runner import TP2, lora_flags, make_base, train_adapter
from tools.checkpoint import util


def test_adapters_on_a_torch_dist_base_train_as_on_its_torch_copy(tmp_path):
    dist_base = make_base(str(tmp_path / "dist_base"), train_iters=3, ckpt_format="torch_dist")
    assert os.path.isfile(os.path.join(dist_base, "iter_0000003", "metadata.json"))
    torch_base = str(tmp_path / "torch_base")  # the same weights, bitwise (tests/tools/checkpoint/)
    assert util.main(["--model-type", "GPT", "--load-dir", dist_base, "--save-dir", torch_base]) == 0
    lora = lora_flags(dora=True)
    on_dist = train_adapter(dist_base, str(tmp_path / "adapter"), lora, world_size=2, layout=TP2)
    on_torch = train_adapter(torch_base, None, lora, world_size=2, layout=TP2)
    assert on_dist == on_torch
    assert os.path.isdir(os.path.join(tmp_path, "adapter", "iter_0000003", "mp_rank_00"))  # torch format
