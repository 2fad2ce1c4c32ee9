"""tools/checkpoint/util.py and torch_dist checkpoints: HF -> torch_dist -> HF
and torch -> torch_dist -> torch are bitwise; a torch_dist checkpoint written
by the tool loads in the driver under TP=2 with transformers' logits.
(A torch_dist checkpoint saved by the training driver -> HF is
test_conversion.py's position-interpolation test: pretrain_gpt.py saves
torch_dist by default.)"""

import os

import pytest
import torch

from tests.tools.checkpoint.test_conversion import (
    ATOL, MODELS, assert_same_tensors, convert, hf_logits, make_hf_model, megatron_logits, read_megatron,
    read_safetensors, to_megatron, tokens_for,
)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_dist")
    return {name: make_hf_model(root / name, seed=i, **MODELS[name]) for i, name in enumerate(("gqa", "mha_tied"))}


def to_torch_dist(source, save, loader="llama2_hf"):
    return convert(loader, "torch_dist", source, save, "--make-vocab-size-divisible-by", 64)


def read_index_keys(root):
    from megatron.training.checkpoint.files import read_index

    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        tracker = f.read().strip()
    iter_dir = os.path.join(root, "release" if tracker == "release" else f"iter_{int(tracker):07d}")
    return read_index(os.path.join(iter_dir, ".metadata")).state_dict_metadata


@pytest.mark.parametrize("name", ["gqa", "mha_tied"])
def test_hf_to_torch_dist_to_hf_is_bitwise(hf_models, tmp_path, name, capsys):
    dist = to_torch_dist(hf_models[name], tmp_path / "dist")
    keys = read_index_keys(dist)
    # megatron-core's global layout: layers stacked on a leading axis, norms under TE's fused names
    assert keys["decoder.layers.self_attention.linear_qkv.weight"].size[0] == MODELS[name]["num_hidden_layers"]
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert ("output_layer.weight" in keys) == (not MODELS[name]["tie_word_embeddings"])
    capsys.readouterr()
    back = convert("torch_dist", "hf", dist, tmp_path / "hf", "--verify")
    assert_same_tensors(read_safetensors(hf_models[name]), read_safetensors(back))
    # --verify ran the torch_dist side (under its saved TP=1 x PP=1) against the exported HF model
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verify: ")]
    assert len(report) == 1 and "max abs diff" in report[0], report


def test_torch_to_torch_dist_to_torch_is_bitwise(hf_models, tmp_path):
    start = to_megatron(hf_models["gqa"], tmp_path / "tp2pp2", 2, 2)
    dist = convert("megatron", "torch_dist", start, tmp_path / "dist")
    again = convert("megatron", "megatron", dist, tmp_path / "again", "--target-tensor-parallel-size", 2,
                    "--target-pipeline-parallel-size", 2)
    assert_same_tensors(read_megatron(start), read_megatron(again))


def test_tool_written_torch_dist_loads_under_tp2_with_hf_logits(hf_models, tmp_path):
    jobs, expected = [], []
    for name, path in hf_models.items():
        tokens = tokens_for(MODELS[name]["vocab_size"])
        jobs.append((to_torch_dist(path, tmp_path / name), 2, 1, tokens))
        expected.append((name, hf_logits(path, tokens), MODELS[name]["vocab_size"]))
    for (name, reference, vocab), logits in zip(expected, megatron_logits(jobs, world_size=2)):
        diff = (logits[..., :vocab] - reference).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs logit difference {diff}"


def test_a_missing_layer_is_a_clear_error(hf_models, tmp_path, capsys):
    """A torch_dist index whose layer stack is shorter than its args say."""
    import pickle

    from tools.checkpoint import util

    dist = to_torch_dist(hf_models["gqa"], tmp_path / "dist")
    index_path = os.path.join(dist, "release", ".metadata")
    with open(index_path, "rb") as f:
        index = pickle.load(f)
    key = "decoder.layers.mlp.linear_fc2.weight"
    meta = index.state_dict_metadata[key]
    meta.size = torch.Size((3,) + tuple(meta.size[1:]))
    # Layer 3's chunk goes, with its bytes: the index stays consistent (a shorter stack, not a damaged file).
    meta.chunks = [c for c in meta.chunks if c.offsets[0] < 3]
    gone = next(k for k in index.storage_data if k.fqn == key and k.offset[0] == 3)
    info = index.storage_data.pop(gone)
    path = os.path.join(dist, "release", info.relative_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:info.offset] + data[info.offset + info.length:])
    for k, other in index.storage_data.items():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            index.storage_data[k] = type(other)(other.relative_path, other.offset - info.length, other.length)
    with open(index_path, "wb") as f:
        pickle.dump(index, f)
    assert util.main(["--model-type", "GPT", "--loader", "torch_dist", "--saver", "hf", "--load-dir", dist,
                      "--save-dir", str(tmp_path / "out")]) == 2  # a user error (errors.py)
    assert "stacks [3, 4] layers per key, its args say 4" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_a_cut_or_missing_shard_is_one_error_line(hf_models, tmp_path, capsys):
    """The reader's failures (a .distcp cut short or deleted; a metadata.json of another backend) are
    one `error:` line naming the file, where megatron-core's reader gave two tracebacks; nothing is written."""
    import json
    import shutil

    from tools.checkpoint import util

    dist = to_torch_dist(hf_models["gqa"], tmp_path / "dist")
    shard = os.path.join("release", "__0_1.distcp")
    damage = {
        "cut": (lambda root: os.truncate(os.path.join(root, shard), os.path.getsize(os.path.join(root, shard)) // 2),
                f"{shard} is truncated ("),
        "deleted": (lambda root: os.remove(os.path.join(root, shard)), f"{shard} is missing: the checkpoint is "
                                                                     "incomplete"),
        "zarr": (lambda root: json.dump({"sharded_backend": "zarr"}, open(os.path.join(root, "release",
                                                                                      "metadata.json"), "w")),
                 "release/metadata.json names sharded_backend 'zarr': this driver reads megatron-core's torch_dist"),
    }
    capsys.readouterr()
    for name, (edit, expected) in damage.items():
        root, out = str(tmp_path / name), tmp_path / f"out_{name}"
        shutil.copytree(dist, root)
        edit(root)
        assert util.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "hf", "--load-dir", root,
                          "--save-dir", str(out)]) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, (name, err)
        assert errors[0].startswith(f"error: {root}/") and expected in errors[0], (name, errors[0])
        assert not out.exists() and not os.path.exists(f"{out}.partial"), name
