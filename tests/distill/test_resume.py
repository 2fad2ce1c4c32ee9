"""A killed generation run resumes without duplicates or gaps, checked by
document ids: once with the real tool killed by SIGKILL mid-run, once with
the exact worst moment staged (a shard renamed but not yet in the manifest,
a torn manifest line and a temporary shard left behind)."""

import collections
import os
import signal
import subprocess
import sys
import time

from tests.distill.conftest import N_DOCS, SAMPLING, manifest_ids, read_shards, run_generation
from tests.distributed.launcher import ROOT

ELIGIBLE = sorted(f"doc{i}" for i in range(N_DOCS))


def _assert_complete(out):
    ids = manifest_ids(out)
    assert [i for i, n in collections.Counter(ids).items() if n > 1] == []  # no duplicates
    assert sorted(ids) == ELIGIBLE  # no gaps
    kept = [r["id"] for r in read_shards(out)]
    assert len(kept) == len(set(kept)) and set(kept) <= set(ids)


def test_tool_killed_mid_run_resumes_without_duplicates_or_gaps(corpus, teacher_dir, hf_teacher, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "generate_synthetic_data.py"), "--input", corpus[0],
           "--teacher", teacher_dir, "--teacher-name", "tiny-llama", "--backend", "hf", "--output-dir", str(out),
           "--prefix-length", "16", "--max-new-tokens", str(SAMPLING["max_new_tokens"]),
           "--temperature", str(SAMPLING["temperature"]), "--top-k", str(SAMPLING["top_k"]),
           "--seed", str(SAMPLING["seed"]), "--min-continuation-tokens", "4",
           "--batch-size", "1", "--docs-per-shard", "2"]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 300
    try:
        while not (manifest.exists() and manifest.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the tool wrote no two shards in 300 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(manifest_ids(out))
    assert 4 <= done_before < N_DOCS

    report = run_generation(corpus[0], hf_teacher, out)  # same settings, other batch and shard sizes
    assert report.already_done == done_before and report.handled == N_DOCS - done_before
    _assert_complete(out)


def test_kill_between_rename_and_manifest(corpus, hf_teacher, tmp_path):
    run_generation(corpus[0], hf_teacher, tmp_path, max_docs=8, docs_per_shard=4)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    # shard_00001 is renamed but its manifest line was torn by the kill; a temporary shard is left too
    manifest.write_text(lines[0] + lines[1][:25])
    (tmp_path / "shards" / "shard_00002.jsonl.tmp-999").write_text('{"id": "doc9"}\n')

    logs = []
    report = run_generation(corpus[0], hf_teacher, tmp_path, log=logs.append)
    assert report.already_done == 4 and report.handled == N_DOCS - 4
    assert any("torn" in m for m in logs) and any("shard_00001.jsonl" in m for m in logs)
    _assert_complete(tmp_path)
