"""Benchmark tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py.

Getting Megatron-LM's tool (release core_v0.16.1, run with the same pip
megatron-core as ours; keep it outside this repository):

    git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/megatron-lm
    pip install triton          # its tool imports the training stack, which imports triton

    python benchmarks/preprocess_benchmark.py --megatron-lm /tmp/megatron-lm --out benchmarks/results/preprocess_cpu.md

Corpus: Python's language reference (pydoc_data, shipped with Python) cut into
~4 KB documents and repeated to --size-mb. Tokenizers: a sentencepiece BPE and
an HF byte-level BPE (8,000 pieces each) trained on it. For each tokenizer it
measures: the floor (tokenization alone on all cores: the better of the
library's multi-threaded batch call — sentencepiece `encode(list,
num_threads=cores)`, tokenizers `encode_batch_fast` — and single-threaded
batch calls in one process per core, in calls of --floor-batch documents), both tools end to end with the same --workers, identical
output bytes, start-up (wall time on a one-line input), our docs/s for each
--workers, and the peak RSS summed over each tool's process tree.

The machine these run on is noisy (the tokenizer's own rate moves by 20-30%
within a minute on a shared 2-vCPU VM), so the fraction of the floor is never
a floor measured once against a run measured later: each of --rounds rounds
measures the floor, runs the tool, and measures the floor again, and the
tool's steady rate is divided by the mean of the two floors around it. The
table gives the median round and every round's ratio. Megatron-LM's tool is
bracketed by floors the same way.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OURS = os.path.join(ROOT, "tools", "preprocess_data.py")


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants, from /proc."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                rss[int(entry)] = next((int(l.split()[1]) for l in f if l.startswith("VmRSS:")), 0)
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def timed_run(cmd, cwd=None):
    """(wall seconds, peak tree RSS in MB, stderr) of one command."""
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_kb(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = proc.stderr.read()
    proc.wait()
    wall = time.time() - t
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak[0] / 1024, err


def build_inputs(work: str, size_mb: float):
    from megatron.training.data.sample_corpus import (
        sample_documents, train_sample_hf_tokenizer, train_sample_tokenizer, write_sample_corpus,
    )

    base = os.path.join(work, "base.jsonl")
    write_sample_corpus(base, max_chars=4000)
    sp = train_sample_tokenizer(base, os.path.join(work, "sp"), vocab_size=8000)
    hf = train_sample_hf_tokenizer(base, os.path.join(work, "hf"), vocab_size=8000)
    repeat = max(1, int(size_mb * 1e6 / os.path.getsize(base)) + 1)
    corpus = os.path.join(work, "corpus.jsonl")
    docs = write_sample_corpus(corpus, repeat=repeat, max_chars=4000)
    one = os.path.join(work, "one.jsonl")
    with open(one, "w") as f:
        f.write(json.dumps({"text": sample_documents()[0]}) + "\n")
    return corpus, docs, one, {"sentencepiece (Llama2Tokenizer)": ("Llama2Tokenizer", sp),
                               "HF byte-level BPE (HuggingFaceTokenizer)": ("HuggingFaceTokenizer", hf)}


_FLOOR = {}


def _encoder(tok_type: str, model: str):
    """A function texts -> ids on one thread (the library's batch call)."""
    if tok_type == "Llama2Tokenizer":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=model)
        return lambda texts, threads=1: sp.encode(texts, num_threads=threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    return lambda texts, threads=1: tok.encode_batch_fast(texts, add_special_tokens=False)


def _encode_in_batches(encode, texts, batch: int, threads: int = 1) -> int:
    for i in range(0, len(texts), batch):
        encode(texts[i:i + batch], threads=threads)
    return len(texts)


def _encode_share(i: int) -> int:
    texts, cores, encode, batch = _FLOOR["texts"], _FLOOR["cores"], _FLOOR["encode"], _FLOOR["batch"]
    return _encode_in_batches(encode, texts[i::cores], batch)


def floor_rate(tok_type: str, model: str, corpus: str, cores: int, max_docs: int = 8000, batch: int = 256,
               tries: int = 1) -> float:
    """Tokenization itself on all cores (docs/s): the better of the library's
    own multi-threaded batch call and one single-threaded batch call per core
    in separate processes (`tries` of each), over the first `max_docs`
    documents in calls of `batch` documents (our tool's 1 MB blocks hold ~300
    of these; one call over thousands of documents is slower, as it keeps
    every result alive at once)."""
    import multiprocessing

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(l)["text"] for _, l in zip(range(max_docs), f)]
    encode = _encoder(tok_type, model)
    best = 0.0
    for _ in range(tries):
        t = time.time()
        _encode_in_batches(encode, texts, batch, threads=cores)  # sentencepiece threads / tokenizers' rayon pool
        best = max(best, len(texts) / (time.time() - t))
    _FLOOR.update(texts=texts, cores=cores, encode=encode, batch=batch)
    env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(abs, range(cores))  # processes started before timing
        for _ in range(tries):
            t = time.time()
            pool.map(_encode_share, range(cores), chunksize=1)
            best = max(best, len(texts) / (time.time() - t))
    if env is None:
        os.environ.pop("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = env
    return best


def tool_cmd(tool: str, inp: str, prefix: str, tok_type: str, model: str, workers: int):
    return [sys.executable, tool, "--input", inp, "--output-prefix", prefix, "--tokenizer-type", tok_type,
            "--tokenizer-model", model, "--append-eod", "--workers", str(workers), "--log-interval", "1000000"]


def same_bytes(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        if not (os.path.exists(a + ext) and os.path.exists(b + ext)):
            return False
        if subprocess.run(["cmp", "-s", a + ext, b + ext]).returncode != 0:
            return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", help="checkout of Megatron-LM core_v0.16.1 (see the module docstring)")
    p.add_argument("--size-mb", type=float, default=100)
    p.add_argument("--workers", default=None, help="comma list; default 1,2,<cores>")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--floor-docs", type=int, default=8000,
                   help="documents each floor measurement encodes (more averages out a noisy machine)")
    p.add_argument("--floor-batch", type=int, default=256, help="documents per batch call in the floor")
    p.add_argument("--rounds", type=int, default=3, help="floor / our tool / floor rounds (the median is reported)")
    p.add_argument("--out", default=None, help="also write the results as markdown here")
    args = p.parse_args()
    cores = os.cpu_count()
    worker_counts = sorted({int(w) for w in (args.workers or f"1,2,{cores}").split(",")})
    work = args.work_dir or tempfile.mkdtemp(prefix="preprocess-bench-")
    os.makedirs(work, exist_ok=True)
    corpus, ndocs, one, tokenizers = build_inputs(work, args.size_mb)
    mb = os.path.getsize(corpus) / 1e6
    mlm_tool = os.path.join(args.megatron_lm, "tools", "preprocess_data.py") if args.megatron_lm else None
    lines = ["# tools/preprocess_data.py vs Megatron-LM core_v0.16.1 tools/preprocess_data.py", "",
             f"Machine: {platform.processor() or platform.machine()}, {cores} CPU cores "
             f"({_cpu_model()}), {platform.system()}, Python {platform.python_version()}.",
             f"Corpus: {ndocs:,} documents, {mb:.1f} MB jsonl (pydoc_data reference, ~4 KB documents, repeated). "
             f"Same --workers ({cores}) for both tools; `--append-eod`; default (megatron-core) tokenizer semantics.", ""]
    for name, (tok_type, model) in tokenizers.items():
        floor = lambda: floor_rate(tok_type, model, corpus, cores, args.floor_docs, args.floor_batch)  # noqa: E731
        start_ours = timed_run(tool_cmd(OURS, one, os.path.join(work, "s1"), tok_type, model, 1))[0]
        per_workers = {}
        for w in worker_counts:
            if w != cores:
                per_workers[w] = timed_run(tool_cmd(OURS, corpus, os.path.join(work, f"ours{w}"), tok_type, model, w))[:2]
        rounds = []  # (floor before, wall, peak RSS, floor after) of our tool at --workers cores
        for _ in range(args.rounds):
            before = floor()
            wall, rss, _ = timed_run(tool_cmd(OURS, corpus, os.path.join(work, f"ours{cores}"), tok_type, model, cores))
            rounds.append((before, wall, rss, floor()))
        ratios = [ndocs / (wall - start_ours) / ((f0 + f1) / 2) for f0, wall, _, f1 in rounds]
        mid = sorted(range(len(rounds)), key=lambda i: ratios[i])[(len(rounds) - 1) // 2]  # lower median
        f0, wall, rss, f1 = rounds[mid]
        per_workers[cores] = (wall, rss)
        steady = ndocs / (wall - start_ours)
        mlm = None
        if mlm_tool:
            start_mlm = timed_run(tool_cmd(mlm_tool, one, os.path.join(work, "m1"), tok_type, model, 1))[0]
            m0 = floor()
            mwall, mrss, _ = timed_run(tool_cmd(mlm_tool, corpus, os.path.join(work, "mlm"), tok_type, model, cores))
            m1 = floor()
            mlm = (mwall, mrss, start_mlm, same_bytes(os.path.join(work, "mlm_text_document"),
                                                      os.path.join(work, f"ours{cores}_text_document")), (m0 + m1) / 2)
        lines += [f"## {name}", "", "| measure | ours | Megatron-LM | ratio |", "|---|---|---|---|"]
        if mlm:
            lines.append(f"| identical .bin/.idx bytes | {'yes' if mlm[3] else 'NO'} | | |")
        lines.append(f"| tokenizer floor: batched encoding alone on {cores} cores, before / after the run | "
                     f"{f0:,.0f} / {f1:,.0f} docs/s | " + (f"{mlm[4]:,.0f} docs/s (mean) |" if mlm else "|") + " |")
        mlm_steady = ndocs / (mlm[0] - mlm[2]) if mlm else None
        lines.append(f"| steady rate (start-up excluded), fraction of the floor around it (median of "
                     f"{len(rounds)} rounds) | {steady:,.0f} docs/s = {ratios[mid]:.0%} | " +
                     (f"{mlm_steady:,.0f} docs/s = {mlm_steady / mlm[4]:.0%} |" if mlm else "|") + " |")
        lines.append(f"| every round's fraction of the floor | {', '.join(f'{r:.0%}' for r in ratios)} | | |")
        lines.append(f"| end to end, start-up included, --workers {cores} | {ndocs / wall:,.0f} docs/s "
                     f"({mb / wall:.2f} MB/s, {wall:.1f} s) | " +
                     (f"{ndocs / mlm[0]:,.0f} docs/s ({mb / mlm[0]:.2f} MB/s, {mlm[0]:.1f} s) | "
                      f"{mlm[0] / wall:.2f}x |" if mlm else "| |"))
        lines.append(f"| start-up (wall time on a one-line input) | {start_ours:.2f} s | " +
                     (f"{mlm[2]:.2f} s | |" if mlm else "| |"))
        lines.append(f"| peak RSS of the process tree | {rss:,.0f} MB | " + (f"{mlm[1]:,.0f} MB | |" if mlm else "| |"))
        for w in worker_counts:
            ww, wr = per_workers[w]
            lines.append(f"| ours, --workers {w} | {ndocs / ww:,.0f} docs/s ({ww:.1f} s, {wr:,.0f} MB) | | "
                         f"{per_workers[worker_counts[0]][0] / ww:.2f}x vs --workers {worker_counts[0]} |")
        lines.append("")
        print("\n".join(lines[-13:]), flush=True)
    text = "\n".join(lines) + "\n"
    from bench_report import emit

    emit(text, args.out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
