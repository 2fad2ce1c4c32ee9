"""Loading a torch_dist checkpoint never unpickles code, and a damaged one
says which file and which iteration to resume from instead. An object whose
unpickling would write a marker file is planted in each place a checkpoint
holds pickled data, and the driver's loader refuses each copy with a one-line
error while the marker stays absent. For the places where megatron-core's
and torch's own readers unpickle freely, the same copy run through those
readers does write the marker: the plants are live, the gaps were real."""

import os
import pickle
import shutil

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.training.checkpoint.torch_dist.conftest import tiny_argv

ENTRY = "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4"  # a ShardedObject: a byte entry
TENSOR = "decoder.final_layernorm.weight"


class WritesMarker:
    """Unpickling this calls open(path, "w"): the marker file appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _iteration_dir(root):
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(root, f"iter_{int(f.read()):07d}")


def _read_index(iter_dir):
    with open(os.path.join(iter_dir, ".metadata"), "rb") as f:
        return pickle.load(f)  # the test's own, trusted copy


def _replace_entry(iter_dir, key, payload: bytes):
    """Put `payload` in place of the data of `key`'s index entry; the entries
    after it in its file move along, so the index stays consistent (entries
    end to end) and only the planted payload is new."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    index = _read_index(iter_dir)
    (storage_key,) = [k for k in index.storage_data if isinstance(k, MetadataIndex) and k.fqn == key]
    info = index.storage_data[storage_key]
    path = os.path.join(iter_dir, info.relative_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:info.offset] + payload + data[info.offset + info.length:])
    shift = len(payload) - info.length
    for k, other in index.storage_data.items():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            index.storage_data[k] = type(other)(relative_path=other.relative_path, offset=other.offset + shift,
                                                length=other.length)
    index.storage_data[storage_key] = type(info)(relative_path=info.relative_path, offset=info.offset,
                                                 length=len(payload))
    with open(os.path.join(iter_dir, ".metadata"), "wb") as f:
        pickle.dump(index, f)


def _torch_bytes(obj) -> bytes:
    path = f"/tmp/_planted_{os.getpid()}.pt"
    torch.save(obj, path)
    data = open(path, "rb").read()
    os.remove(path)
    return data


def plant_in_common(iter_dir, marker):
    common = torch.load(os.path.join(iter_dir, "common.pt"), weights_only=False)
    common["args"].evil = WritesMarker(marker)
    torch.save(common, os.path.join(iter_dir, "common.pt"))


def plant_in_index(iter_dir, marker):
    index = _read_index(iter_dir)
    index.planner_data = WritesMarker(marker)
    with open(os.path.join(iter_dir, ".metadata"), "wb") as f:
        pickle.dump(index, f)


def plant_in_byte_entry(iter_dir, marker):
    _replace_entry(iter_dir, ENTRY, _torch_bytes([WritesMarker(marker)]))


def plant_in_tensor_entry(iter_dir, marker):
    _replace_entry(iter_dir, TENSOR, _torch_bytes(WritesMarker(marker)))


PLANTS = {"common.pt": plant_in_common, ".metadata": plant_in_index, "byte entry": plant_in_byte_entry,
          "tensor entry": plant_in_tensor_entry}


def _unprotected_read(place, iter_dir):
    """What megatron-core / torch.distributed.checkpoint read `place` with."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader

    if place == "common.pt":
        dist_checkpointing.load_common_state_dict(iter_dir)  # torch.load, weights_only left to the environment
    elif place == ".metadata":
        FileSystemReader(iter_dir).read_metadata()  # pickle.load
    elif place == "byte entry":
        entry = ShardedObject(ENTRY.split("/")[0], None, (4,), (0,), replica_id=0)
        dist_checkpointing.load({"x": entry}, iter_dir, validate_access_integrity=False)  # weights_only=False


def _load_each(rank, world_size, roots, markers, argv):
    """The driver's own loader on each planted copy, in one process; then the
    unprotected readers on the same copies."""
    # With this set, torch.load calls that leave weights_only unset unpickle anything.
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    from megatron.training import training
    from megatron.training.checkpoint import save_load
    from megatron.training.errors import CheckpointError
    from megatron.training.models.llama import build_gpt_model

    args = training.setup_args(list(argv) + ["--load", roots["clean"]])
    training.build_tokenizer_from_args(args)
    model = training.build_model(args, build_gpt_model)
    optimizer, scheduler = training.build_optimizer(args, model)
    errors = {"clean": save_load.load_checkpoint(args, model, optimizer, scheduler)}
    for place in PLANTS:
        args.load = roots[place]
        try:
            save_load.load_checkpoint(args, model, optimizer, scheduler)
            errors[place] = None
        except CheckpointError as e:
            errors[place] = str(e)
    # A cut file of the latest iteration: named, with the iteration to resume from instead, which then loads.
    args.load = roots["truncated"]
    try:
        save_load.load_checkpoint(args, model, optimizer, scheduler)
        errors["truncated"] = None
    except CheckpointError as e:
        errors["truncated"] = str(e)
    args.ckpt_step = 4
    errors["truncated_step4"] = save_load.load_checkpoint(args, model, optimizer, scheduler)
    args.ckpt_step = None
    ran_before_unprotected = {place: os.path.exists(m) for place, m in markers.items()}
    for place in PLANTS:
        try:
            _unprotected_read(place, _iteration_dir(roots[place]))
        except Exception:  # noqa: BLE001 - the payload returns a file object where data was expected
            pass
    return errors, ran_before_unprotected, {place: os.path.exists(m) for place, m in markers.items()}


def test_planted_objects_do_not_run(tp2_run, tmp_path):
    source, _ = tp2_run
    roots, markers = {"clean": str(tmp_path / "clean")}, {}
    shutil.copytree(source, roots["clean"])
    for i, (place, plant) in enumerate(PLANTS.items()):
        roots[place], markers[place] = str(tmp_path / f"planted{i}"), str(tmp_path / f"ran{i}")
        shutil.copytree(source, roots[place])
        plant(_iteration_dir(roots[place]), markers[place])

    roots["truncated"] = str(tmp_path / "truncated")
    shutil.copytree(source, roots["truncated"])
    with open(os.path.join(roots["truncated"], "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("6")
    cut = os.path.join(roots["truncated"], "iter_0000006", "__0_0.distcp")
    os.truncate(cut, os.path.getsize(cut) // 2)

    argv = tiny_argv(["--use-distributed-optimizer"])
    errors, ran_in_driver, ran_unprotected = run_distributed(_load_each, world_size=1,
                                                            args=(roots, markers, argv))[0]
    assert errors["clean"] == (4, 32)  # the unplanted copy loads: iteration 4, 4 x 8 samples
    assert ran_in_driver == {place: False for place in PLANTS}
    expected = {
        "common.pt": "common.pt holds an object that loading with weights_only=True refuses "
                     "(Unsupported global: GLOBAL io.open",
        ".metadata": ".metadata asks to build io.open, which a checkpoint index never holds",
        "byte entry": f"(entry {ENTRY}) holds an object that loading with weights_only=True refuses",
        "tensor entry": "Unsupported global: GLOBAL io.open",
    }
    for place, text in expected.items():
        assert errors[place] is not None and text in errors[place], (place, errors[place])
        assert "\n" not in errors[place]
    # A damaged checkpoint: the file, what is wrong, and the iteration that loads (which it does).
    assert errors["truncated"].startswith(f"{cut} is truncated"), errors["truncated"]
    assert (f"Iteration 4 ({roots['truncated']}/iter_0000004) is complete: resume from it with --ckpt-step 4"
            in errors["truncated"])
    assert errors["truncated_step4"] == (4, 32)
    # megatron-core's and torch's readers run the very same plants
    assert ran_unprotected == {"common.pt": True, ".metadata": True, "byte entry": True, "tensor entry": False}


@pytest.mark.parametrize("payload", [WritesMarker("x"), {"fine": 1}])
def test_index_unpickler_takes_index_classes_only(tp2_run, tmp_path, payload):
    """The restricted unpickler reads a real index, and refuses anything else
    (a plain dict unpickles, but is not an index: refused as such)."""
    from megatron.training.errors import CheckpointError
    from megatron.training.checkpoint.files import read_index
    from torch.distributed.checkpoint.metadata import Metadata

    iter_dir = _iteration_dir(tp2_run[0])
    assert isinstance(read_index(os.path.join(iter_dir, ".metadata")), Metadata)
    path = str(tmp_path / "index")
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    if isinstance(payload, WritesMarker):
        with pytest.raises(CheckpointError, match="asks to build io.open"):
            read_index(path)
        assert not os.path.exists("x")
    else:
        with pytest.raises(CheckpointError, match=f"{path} is damaged: it holds a dict, not a checkpoint index"):
            read_index(path)
