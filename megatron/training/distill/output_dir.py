"""The output folder of a generation run, and what makes it resumable.

    OUT/run_config.json     teacher, sampling, prefix and filter settings of the first run
    OUT/shards/shard_NNNNN.jsonl   complete shards (written as *.tmp-PID, renamed when complete)
    OUT/manifest.jsonl      one line per complete shard: the ids of every document it handled
                            (kept or filtered) and its counts; appended after the rename
    OUT/failed.jsonl        prompts that failed after every retry (retried by the next run)
    OUT/report.json         totals over all runs

A document is done when its id is in the manifest. A shard renamed but not yet
in the manifest (a kill between the two steps) is removed on restart and its
documents are generated again, so outputs never hold a document twice and
never miss one.
"""

import fcntl
import json
import os
import re
from typing import Dict, List, Optional, Set

from megatron.training.fileio import append_synced, atomic_write_text, temp_name
from megatron.training.errors import UserError

SHARD_RE = re.compile(r"^shard_(\d{5,})\.jsonl$")


class OutputDirError(UserError, RuntimeError):
    pass


class OutputDir:
    def __init__(self, path: str, log=print):
        self.path = path
        self.shard_dir = os.path.join(path, "shards")
        self.manifest = os.path.join(path, "manifest.jsonl")
        self.failed = os.path.join(path, "failed.jsonl")
        self.log = log
        os.makedirs(self.shard_dir, exist_ok=True)
        # flock is released by the kernel when the holder dies, so a killed run leaves no stale lock
        self._lock = open(os.path.join(path, ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirError(f"another run is writing to {path}: wait for it to end or use another --output-dir")

    def close(self) -> None:
        self._lock.close()

    def check_config(self, config: dict) -> None:
        """Record `config` on the first run; a later run must use the same one."""
        path = os.path.join(self.path, "run_config.json")
        if os.path.exists(path):
            with open(path) as f:
                first = json.load(f)
            diff = {k: (first.get(k), v) for k, v in config.items() if first.get(k) != v}
            if diff:
                what = "; ".join(f"{k}: first run {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise OutputDirError(f"{self.path} was started with other settings ({what}): rerun with the first "
                                     "run's flags to resume, or use a new --output-dir")
            return
        self.write_json("run_config.json", config)

    def entries(self) -> List[dict]:
        """The manifest's complete lines; a torn last line (a kill while appending) is cut off."""
        if not os.path.exists(self.manifest):
            return []
        with open(self.manifest, "rb") as f:
            data = f.read()
        entries, good = [], []
        for line in data[:data.rfind(b"\n") + 1].splitlines(keepends=True):
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
            good.append(line)
        kept = b"".join(good)
        if kept != data:
            self.log(f"manifest {self.manifest}: dropping a torn last entry left by an interrupted run")
            with open(self.manifest, "wb") as f:
                f.write(kept)
        return entries

    def recover(self) -> Set[str]:
        """Clean up after an interrupted run; returns the ids of the documents already done."""
        entries = self.entries()
        listed = {e["shard"] for e in entries}
        for name in sorted(os.listdir(self.shard_dir)):
            full = os.path.join(self.shard_dir, name)
            if ".tmp-" in name:
                os.remove(full)
            elif SHARD_RE.match(name) and name not in listed:
                self.log(f"removing {full}: renamed but not in the manifest (interrupted run); "
                         "its documents are generated again")
                os.remove(full)
        self.next_index = 1 + max([int(SHARD_RE.match(n).group(1)) for n in listed] + [-1])
        return {i for e in entries for i in e["ids"]}

    def open_shard(self) -> "ShardWriter":
        shard = ShardWriter(self, f"shard_{self.next_index:05d}.jsonl")
        self.next_index += 1
        return shard

    def log_failure(self, record: dict) -> None:
        append_synced(self.failed, json.dumps(record, ensure_ascii=False) + "\n")

    def still_failed(self, done: Set[str]) -> Dict[str, dict]:
        """Failures logged by any run whose document is still not done, by id (the last record)."""
        out: Dict[str, dict] = {}
        if os.path.exists(self.failed):
            with open(self.failed, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec["id"] not in done:
                        out[rec["id"]] = rec
        return out

    def write_json(self, name: str, obj: dict) -> str:
        path = os.path.join(self.path, name)
        atomic_write_text(path, json.dumps(obj, indent=1))
        return path


class ShardWriter:
    """Records go to a temporary file; `commit` renames it and records its documents as done."""

    def __init__(self, out: OutputDir, name: str):
        self.out = out
        self.name = name
        self.final = os.path.join(out.shard_dir, name)
        self.tmp = temp_name(self.final)
        self._f = open(self.tmp, "w", encoding="utf-8")
        self.ids: List[str] = []
        self.kept = 0
        self.filtered: Dict[str, int] = {}
        self.generated_tokens = 0

    def add(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.ids.append(record["id"])
        self.kept += 1

    def drop(self, doc_id: str, reason: str) -> None:
        self.ids.append(doc_id)
        self.filtered[reason] = self.filtered.get(reason, 0) + 1

    def commit(self) -> Optional[dict]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        entry = dict(shard=self.name, kept=self.kept, filtered=self.filtered,
                     generated_tokens=self.generated_tokens, ids=self.ids)
        append_synced(self.out.manifest, json.dumps(entry, ensure_ascii=False) + "\n")
        return entry

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
