"""What a torch_dist load says about damaged files: with --ckpt-checksum a
byte flipped in any file (a .distcp shard, common.pt, .metadata) is named by
its SHA-256; without it, common.pt's zip CRCs and the index's consistency
still name a damaged common.pt or .metadata, and a metadata.json naming
another backend is refused. Each is one `error:` line (exit status 2, through
errors.run_main) naming the file and the iteration to resume from instead,
and the load writes nothing. The copies are of the shared checkpoint saved
with --ckpt-checksum (conftest.py), loaded by the driver's own loader."""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess

import pytest

from tests.distributed.launcher import run_distributed
from tests.training.checkpoint.torch_dist.conftest import tiny_argv

LOADED, FALLBACK = 6, 4  # the copies' tracker names iteration 6; iteration 4 stays intact
ENTRY = "optimizer.state.exp_avg_sq.decoder.layers.mlp.linear_fc1.weight"  # an optimizer-state entry, as the issue's


def _iter_dir(root, iteration=LOADED):
    return os.path.join(root, f"iter_{iteration:07d}")


def _flip(path, offset, mask=0x40):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _flip_in_an_optimizer_entry(iter_dir):
    """One byte of an Adam moment in the last shard file holding one of ENTRY's chunks: the high
    byte of a float32 in the middle of the tensor's data."""
    import torch

    with open(os.path.join(iter_dir, ".metadata"), "rb") as f:
        index = pickle.load(f)  # the test's own, trusted copy
    info = max((v for k, v in index.storage_data.items() if k.fqn == ENTRY), key=lambda v: v.relative_path)
    path = os.path.join(iter_dir, info.relative_path)
    with open(path, "rb") as f:
        f.seek(info.offset)
        entry = f.read(info.length)
    values = torch.load(io.BytesIO(entry), weights_only=True).numpy().tobytes()
    _flip(path, info.offset + entry.index(values) + (len(values) // 8) * 4 + 3)
    return info.relative_path


def _flip_in_common(iter_dir):
    """The stored flag async_save becomes async_sawe, as in the issue (a flip zip's CRC sees, torch.load does not)."""
    path = os.path.join(iter_dir, "common.pt")
    _flip(path, open(path, "rb").read().index(b"async_save") + 8, mask=0x01)
    return "common.pt"


def _flip_in_an_index_key(iter_dir):
    """One letter of the name of a storage entry (a MetadataIndex's fqn): the reader used to fail on the
    lookup and quote `MetadataIndex(fqn=...)`, never saying .metadata was damaged."""
    path = os.path.join(iter_dir, ".metadata")
    data, name = open(path, "rb").read(), b"decoder.final_layernorm.weight"
    start, end = data.index(b"storage_data"), data.index(b"storage_meta")
    opcode = b"\x8c" + bytes([len(name)]) + name  # the string itself (SHORT_BINUNICODE), not a longer name's tail
    _flip(path, data.index(opcode, start, end) + 2 + name.index(b"_layernorm") - 1)  # final_ -> fina,_
    return ".metadata"


def _marker(backend):
    def write(iter_dir):
        path = os.path.join(iter_dir, "metadata.json")
        config = json.load(open(path))
        config["sharded_backend"] = backend
        json.dump(config, open(path, "w"))
        return "metadata.json"
    return write


DAMAGE = {"distcp": _flip_in_an_optimizer_entry, "common": _flip_in_common, "index": _flip_in_an_index_key,
          "zarr": _marker("zarr"), "torch": _marker("torch")}
# (case: copy, --ckpt-checksum)
CASES = {
    "clean, verified": ("clean", True), "distcp, verified": ("distcp", True), "distcp, unverified": ("distcp", False),
    "common, verified": ("common", True), "common, unverified": ("common", False),
    "index, verified": ("index", True), "index, unverified": ("index", False),
    "zarr": ("zarr", False), "torch": ("torch", False),
}


def _listing(root):
    return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs)


def _load_each(rank, world_size, cases, argv):
    """Each (root, --ckpt-checksum) loaded by the driver through errors.run_main, in one process:
    {case: (exit status, stderr, the (iteration, samples) loaded, whether the copy is unchanged)}."""
    from megatron.training import training
    from megatron.training.checkpoint import save_load
    from megatron.training.errors import run_main
    from megatron.training.models.llama import build_gpt_model

    args = training.setup_args(list(argv) + ["--load", next(iter(cases.values()))[0]])
    training.build_tokenizer_from_args(args)
    model = training.build_model(args, build_gpt_model)
    optimizer, scheduler = training.build_optimizer(args, model)
    out = {}
    for name, (root, checksum) in cases.items():
        args.load, args.ckpt_checksum, loaded = root, checksum, []
        before, err = _listing(root), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_main(lambda: loaded.append(save_load.load_checkpoint(args, model, optimizer, scheduler)))
        out[name] = (code, err.getvalue(), loaded[0] if loaded else None, _listing(root) == before)
    return out


@pytest.fixture(scope="module")
def loads(tp2_run, tmp_path_factory):
    """{case: (copy root, damaged file, (exit status, stderr, loaded, unchanged))}"""
    tmp = tmp_path_factory.mktemp("integrity")
    roots, damaged = {}, {}
    for copy in ["clean", *DAMAGE]:
        roots[copy] = str(tmp / copy)
        shutil.copytree(tp2_run[0], roots[copy])
        with open(os.path.join(roots[copy], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(LOADED))
        if copy in DAMAGE:
            damaged[copy] = os.path.join(_iter_dir(roots[copy]), DAMAGE[copy](_iter_dir(roots[copy])))
    cases = {name: (roots[copy], checksum) for name, (copy, checksum) in CASES.items()}
    results = run_distributed(_load_each, world_size=1, args=(cases, tiny_argv(["--use-distributed-optimizer"])))[0]
    return {name: (roots[copy], damaged.get(copy), results[name]) for name, (copy, _) in CASES.items()}


def test_checksums_cover_every_file_of_each_saved_iteration(tp2_run):
    """Two ranks, two writer processes each: four shards hashed where they were written, common.pt, the
    index and metadata.json by rank 0; nothing of the writers' own digests is left behind."""
    for iteration in (4, 6):
        iter_dir = _iter_dir(tp2_run[0], iteration)
        files = sorted(os.listdir(iter_dir))
        assert files == [".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp",
                         "checksums.sha256", "common.pt", "metadata.json"]
        check = subprocess.run(["sha256sum", "--strict", "-c", "checksums.sha256"], cwd=iter_dir,
                               capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.count(": OK") == len(files) - 1, check


def _one_error_line(result):
    code, err, _, unchanged = result
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert unchanged, "a load that fails writes nothing"
    return lines[0]


def _with_fallback(root):
    return (f"Iteration {FALLBACK} ({_iter_dir(root, FALLBACK)}) is complete: resume from it with "
            f"--ckpt-step {FALLBACK}")


@pytest.mark.parametrize("copy", ["distcp", "common", "index"])
def test_ckpt_checksum_names_the_flipped_file(loads, copy):
    root, path, result = loads[f"{copy}, verified"]
    line = _one_error_line(result)
    assert line.startswith(f"error: {path}: its SHA-256 ") and "recorded in checksums.sha256" in line, line
    assert _with_fallback(root) in line, line


def test_a_clean_copy_loads_verified_and_a_flipped_shard_loads_silently_without_it(loads):
    assert loads["clean, verified"][2][:3] == (0, "", (LOADED, LOADED * 8))
    # The damage only checksums see: an Adam moment changed, loaded without a word (the finding).
    assert loads["distcp, unverified"][2][:3] == (0, "", (LOADED, LOADED * 8))


def test_common_pt_crc_damage_is_named_without_checksums(loads):
    root, path, result = loads["common, unverified"]
    line = _one_error_line(result)
    assert line.startswith(f"error: {path} is damaged: its member ") and line.endswith(
        f"/data.pkl fails its CRC-32 check (its bytes changed after it was written). {_with_fallback(root)} "
        f"(or write {FALLBACK} into {root}/latest_checkpointed_iteration.txt)"), line


def test_a_damaged_index_is_named_as_such_without_checksums(loads):
    root, path, result = loads["index, unverified"]
    line = _one_error_line(result)
    assert line.startswith(f"error: {path} is damaged: it stores data for decoder.fina,_layernorm.weight (the chunk "
                           "at [0]), which none of its entries has"), line
    assert "MetadataIndex" not in line and _with_fallback(root) in line, line


@pytest.mark.parametrize("backend", ["zarr", "torch"])
def test_another_backend_in_metadata_json_is_refused(loads, backend):
    root, path, result = loads[backend]
    line = _one_error_line(result)
    assert re.match(rf"error: {re.escape(path)} names sharded_backend '{backend}': this driver reads megatron-core's "
                    "torch_dist checkpoints only", line), line
    assert "--ckpt-convert-format torch_dist" in line and _with_fallback(root) in line, line


def test_the_writers_hook_travels_to_a_persistent_writer_process():
    """--use-persistent-ckpt-worker (GPUs) pickles the save function for its process: the hook goes with
    its plan and without the files of the process that made it."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    from megatron.training.checkpoint.torch_dist.writing import FileStreams

    items = [WriteItem(index=MetadataIndex(f"t{i}", torch.Size([0])), type=WriteItemType.TENSOR) for i in range(3)]
    streams = FileStreams([("/x/__0_0.distcp", "__0_0.distcp", ([], [(items[0], None), (items[1], None)])),
                           ("/x/__0_1.distcp", "__0_1.distcp", ([(items[2], None)], []))], checksum=True)
    streams._files["/x/__0_0.distcp"] = "in use"
    copy = pickle.loads(pickle.dumps(streams))
    assert copy.items == {"/x/__0_0.distcp": 2, "/x/__0_1.distcp": 1} and copy._files == {} and copy.checksum
    assert copy.file_of[MetadataIndex("t2", torch.Size([0]))] == "/x/__0_1.distcp"
