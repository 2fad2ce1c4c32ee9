"""Data tools under kills, damage, full disks and bad input (issue #15,
findings 1, 2, 3, 6, 7): a dataset's .bin and .idx can never be mismatched,
every reader checks that they match, temporaries never outlive a run, and
every failure is one line naming the file and the fix."""

import errno
import gzip
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.data import indexed_writer
from megatron.training.data.indexed_writer import IndexedDatasetWriter
from megatron.training.tokenizer import build_tokenizer
from tests.tools.conftest import REPO, write_jsonl
from tools.convert_nanogpt import main as convert_main
from tools.merge_datasets import main as merge_main
from tools.preprocess_data import main as preprocess_main

TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def preprocess(inp, prefix, sp_model, *extra):
    return preprocess_main(["--input", str(inp), "--output-prefix", str(prefix), "--tokenizer-type", "Llama2Tokenizer",
                            "--tokenizer-model", sp_model, "--workers", "1", *map(str, extra)])


def docs_of(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def make(prefix, docs):
    w = IndexedDatasetWriter(str(prefix), np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(prefix)


# ---------------------------------------------------------------- 1: a kill between the two renames

_KILL_AFTER_BIN_RENAME = """
import os, runpy, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if dst.endswith(".bin"):
        os._exit(9)  # killed between the .bin and the .idx renames
os.replace = replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.dirname(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_kill_between_the_renames_never_pairs_a_new_bin_with_an_old_idx(corpus, sp_model, tmp_path):
    old = write_jsonl(tmp_path / "old.jsonl", [{"text": "the old dataset"}] * 3)
    new = write_jsonl(tmp_path / "new.jsonl", [{"text": d} for d in corpus[1][:40]])
    out = tmp_path / "out"
    assert preprocess(old, out / "c", sp_model) == 0
    prefix = str(out / "c_text_document")
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_BIN_RENAME, TOOL, "--input", new, "--output-prefix",
                           str(out / "c"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model,
                           "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    # The new .bin is in place, and no .idx beside it: the old one went first.
    assert os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert merge_main(["--input", str(out), "--output-prefix", str(tmp_path / "m")]) == 2
    # The next run replaces the lone .bin and sweeps the killed run's temporaries.
    assert preprocess(new, out / "c", sp_model) == 0
    assert sorted(os.listdir(out)) == ["c_text_document.bin", "c_text_document.idx"]
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    assert docs_of(prefix) == [tok.tokenize(d) for d in corpus[1][:40]]


# ---------------------------------------------------------------- 2: every reader checks the pair

def _readers(prefix, tmp_path):
    """Each reader we own, run on `prefix`: (name, its one-line error or None)."""
    from megatron.training.data.pretrain import DataError, check_data_prefixes
    from tasks.lm import EvalError
    from tasks.perplexity import read_indexed_tokens

    out = {}
    folder = tmp_path / "merge_in"
    folder.mkdir(exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, folder / ("x" + ext))
    for name, call in (
            ("merge", lambda: merge_main(["--input", str(folder), "--output-prefix", str(tmp_path / "merged")])),
            ("nanogpt", lambda: convert_main(["to-nanogpt", "--input-prefix", prefix, "--output-dir",
                                              str(tmp_path / "ng")])),
            ("blend", lambda: _blend_main(prefix))):
        out[name] = call()
    args = types.SimpleNamespace(train_iters=1, train_samples=None, global_batch_size=1, eval_interval=None,
                                 eval_iters=0, split="100,0,0")
    config = types.SimpleNamespace(blend=([prefix], None), split_matrix=[(0, 1), None, None])
    for name, call, error in (("driver", lambda: check_data_prefixes(args, config), DataError),
                              ("perplexity", lambda: read_indexed_tokens(prefix), EvalError)):
        try:
            call()
            out[name] = None
        except error as e:
            out[name] = str(e)
    return out


def _blend_main(prefix):
    from tools.build_synthetic_blend import main

    return main(["--original-data-path", prefix, "--synthetic-data-path", prefix, "--synthetic-fraction", "0.5"])


def test_every_reader_rejects_a_bin_that_does_not_match_its_idx(tmp_path, capsys):
    """Finding 2's truncated .bin, and a .bin from another run beside an .idx:
    merge exits 2 (a user error) before writing anything (it printed `merged` and exited 0
    before), and every reader names both files and the fix."""
    big = make(tmp_path / "big", [list(range(1, 500))] * 40)
    other = make(tmp_path / "other", [[7, 8, 9]] * 5)
    truncated = str(tmp_path / "trunc")
    shutil.copy(big + ".idx", truncated + ".idx")
    with open(big + ".bin", "rb") as src, open(truncated + ".bin", "wb") as dst:
        dst.write(src.read(os.path.getsize(big + ".bin") // 2))
    mixed = str(tmp_path / "mixed")
    shutil.copy(big + ".idx", mixed + ".idx")
    shutil.copy(other + ".bin", mixed + ".bin")
    for prefix in (truncated, mixed):
        capsys.readouterr()
        results = _readers(prefix, tmp_path)
        err = capsys.readouterr().err
        assert results["merge"] == 2 and results["nanogpt"] == 2 and results["blend"] == 2, results
        assert not os.path.exists(tmp_path / "merged.bin") and not os.path.exists(tmp_path / "ng" / "train.bin")
        for message in [results["driver"], results["perplexity"]] + err.strip().splitlines():
            assert "x.bin" in message or prefix + ".bin" in message, message
            assert "bytes but" in message and ".idx describes" in message and "rebuild" in message, message
    assert _readers(big, tmp_path) == {"merge": 0, "nanogpt": 0, "blend": 0, "driver": None, "perplexity": None}


# ---------------------------------------------------------------- 3: full disks and stale temporaries

class _DiskFillsUp:
    """A file whose writes fail with ENOSPC past `limit` bytes, and whose close
    fails too (its buffered bytes cannot be flushed): a full disk."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def write(self, data):
        self._left -= len(data)
        if self._left < 0:
            raise OSError(errno.ENOSPC, "No space left on device", self._f.name)
        return self._f.write(data)

    def close(self):
        self._f.close()
        raise OSError(errno.ENOSPC, "No space left on device", self._f.name)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_a_full_disk_leaves_no_temporary_and_one_line(corpus, sp_model, tmp_path, monkeypatch, capsys):
    def full_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return _DiskFillsUp(f, 20_000) if "w" in mode and ".bin" in str(path) else f

    monkeypatch.setattr(indexed_writer, "open", full_open, raising=False)
    out = tmp_path / "out"
    assert preprocess(corpus[0], out / "c", sp_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "No space left on device; the disk is full" in err[-1], err
    assert "c_text_document.bin.tmp-" in err[-1]
    assert os.listdir(out) == []  # the disk is not left full of partial files


def _mount_tmpfs(path, size):
    path.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                              capture_output=True).returncode == 0
    if not ok:
        pytest.skip("needs root and mount to make a small file system (the injected ENOSPC test covers the logic)")


def test_a_really_full_small_file_system(corpus, sp_model, tmp_path):
    """A 256 KB tmpfs: the dataset (~400 KB) does not fit. One line, exit 2 (a user error), and the
    file system is empty again afterwards."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "256k")
    try:
        proc = subprocess.run([sys.executable, TOOL, "--input", corpus[0], "--output-prefix", str(disk / "c"),
                               "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model, "--workers", "1"],
                              capture_output=True, text=True)
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {disk}/c_text_document.") and ".tmp-" in last, last
        assert "No space left on device; the disk is full" in last
        assert "Traceback" not in proc.stderr
        assert os.listdir(disk) == [] and shutil.disk_usage(disk).used == 0
    finally:
        subprocess.run(["umount", str(disk)])


def test_stale_temporaries_of_dead_runs_are_swept_and_live_ones_kept(corpus, sp_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        names = {"dead": f"c_text_document.bin.tmp-{dead.pid}",
                 "dead_partition": f"c_text_document.part0.tmp-{dead.pid}.bin",
                 "live": f"c_text_document.idx.tmp-{live.pid}",
                 "reused": f"c_text_document.docs.tmp-{live.pid}",
                 "other_dataset": f"d_text_document.bin.tmp-{dead.pid}"}
        for name in names.values():
            (out / name).write_bytes(b"x" * 1000)
        hour_ago = time.time() - 3600  # written before the live process started: its PID was reused
        os.utime(out / names["reused"], (hour_ago, hour_ago))
        assert preprocess(write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}]), out / "c", sp_model) == 0
        left = set(os.listdir(out))
    finally:
        live.kill()
    assert left == {names["live"], names["other_dataset"], "c_text_document.bin", "c_text_document.idx"}


# ---------------------------------------------------------------- 6: damaged and bad input, unwritable output

def test_truncated_gzip_keeps_what_was_read(corpus, sp_model, tmp_path, capsys):
    path, docs = corpus
    whole = gzip.compress(open(path, "rb").read())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert preprocess(cut, tmp_path / "o", sp_model) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 2 and str(cut) in warning[0] and "is damaged" in warning[0]  # logged, and in the report
    kept = int(warning[0].split(" after line ")[1].split(":")[0])
    assert 0 < kept < len(docs)
    tok = build_tokenizer("Llama2Tokenizer", sp_model, legacy=False)
    got = docs_of(tmp_path / "o_text_document")
    assert got[:kept] == [tok.tokenize(d) for d in docs[:kept]] and len(got) <= kept + 1
    assert preprocess(cut, tmp_path / "strict", sp_model, "--strict") == 2
    assert "is damaged" in capsys.readouterr().err.strip().splitlines()[-1]


def test_unwritable_output_folder_is_one_line(sp_model, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: refuse the writes as the file system would
        def refuse(path, mode="r", *a, **k):
            if "w" in mode and str(path).startswith(str(locked)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return open(path, mode, *a, **k)

        monkeypatch.setattr(indexed_writer, "open", refuse, raising=False)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    assert preprocess(inp, locked / "c", sp_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(locked) in err[0] and "Permission denied; no permission to write there" in err[0]
    assert "--output-prefix" in err[0]


def test_null_tokenizer_bad_lines_are_skipped_with_file_and_line(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "4 x 5"}, {"text": "5000"},
                                               {"text": "-3 1"}, {"text": "70000"}, {"text": "999 0"}])
    rc = preprocess_main(["--input", str(inp), "--output-prefix", str(tmp_path / "n"), "--tokenizer-type",
                          "NullTokenizer", "--vocab-size", "1000", "--append-eod", "--workers", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert docs_of(tmp_path / "n_text_document") == [[1, 2, 3, 1000], [999, 0, 1000]]
    assert "skipped lines 4 of 6" in err
    for line in (2, 3, 4, 5):
        assert f"skipping {inp}:{line}: text the tokenizer cannot encode" in err


@pytest.mark.parametrize("records", [[], [b"{not json", {"other": "x"}, {"text": ""}]], ids=["empty", "all_bad"])
def test_an_input_without_a_usable_document_is_an_error(sp_model, tmp_path, capsys, records):
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    assert preprocess(inp, tmp_path / "out" / "c", sp_model) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --input {inp} has no usable document")
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- 7: one very long line

_PEAK = """
import resource, sys
sys.path.insert(0, {repo!r})
from tools.preprocess_data import main
rc = main({argv!r})
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_a_very_long_line_stays_in_bounded_memory(corpus, sp_model, tmp_path):
    """A 10 MB single-line document: the worker's peak memory stays under
    250 MB (the whole-text tokenization peaked at ~450 MB for 10 MB, 2.25 GB
    for 50 MB). That the pieces give the whole text's ids is
    test_long_texts_are_tokenized_in_pieces_with_the_same_ids."""
    text = " ".join(corpus[1])
    long = (text * (10_000_000 // len(text) + 1))[:10_000_000]
    inp = write_jsonl(tmp_path / "long.jsonl", [{"text": "short"}, {"text": long}, {"text": "short again"}])
    argv = ["--input", inp, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", sp_model, "--workers", "1"]
    out = subprocess.run([sys.executable, "-c", _PEAK.format(repo=REPO, argv=argv)], capture_output=True, text=True)
    rc, worker_mb = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    assert worker_mb < 250, f"worker peak {worker_mb} MB"
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 3


def test_splits_no_sample_is_asked_of_are_not_built(corpus, sp_model, tmp_path):
    """The driver's own error for an empty split suggests --eval-iters 0; with it, Megatron-LM's
    default --split 969,30,1 on a small corpus (a test share of no document) used to hang forever in
    megatron-core's GPTDataset. Now the unused splits are not built and training data is unchanged."""
    from megatron.training.data.pretrain import build_pretraining_datasets

    assert preprocess(corpus[0], tmp_path / "c", sp_model) == 0
    prefix = str(tmp_path / "c_text_document")
    n_docs = len(IndexedDataset(prefix).document_indices) - 1
    assert int(round(0.999 * n_docs)) == n_docs  # the test share (1 in 1000) holds no document
    args = types.SimpleNamespace(
        seed=1234, seq_length=16, data_path=[prefix], split="969,30,1", data_cache_path=str(tmp_path / "cache"),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, vocab_size=None, mock_data=False,
        train_iters=4, train_samples=None, global_batch_size=2, eval_interval=None, eval_iters=0)
    tokenizer = build_tokenizer("Llama2Tokenizer", sp_model)
    train, valid, test = build_pretraining_datasets(args, tokenizer)
    assert valid is None and test is None and len(train) >= 8
    args.eval_iters = 1  # asked for test samples, the empty share is the driver's one-line error
    from megatron.training.data.pretrain import DataError

    with pytest.raises(DataError, match="leaves the test split of .* with no document"):
        build_pretraining_datasets(args, tokenizer)
