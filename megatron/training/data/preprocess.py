"""jsonl -> megatron-core indexed datasets (`{prefix}_{key}_{document|sentence}.bin/.idx`).

How the work is split, so that the main process never becomes the bottleneck:
- the main process only reads the input in blocks of whole lines (raw bytes,
  ~1 MB) and appends finished token bytes to the output files;
- worker processes decode, parse, split and tokenize a whole block at a time
  (the tokenizer's batch call) and send back compact numpy arrays: the flat
  tokens, the sequence lengths and the sequences per document;
- at most a few blocks are in flight, so memory stays flat in the input size.

Documents come out in input order, or, with `--partitions N`, in the order
Megatron-LM's tool produces for N partitions (line i goes to partition
i mod N, partitions concatenated), so the bytes are the same as its output.
"""

import itertools
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.training.data.indexed_writer import IndexedDatasetWriter, optimal_dtype, temp_name
from megatron.training.data.jsonl_reader import (
    BAD_DESCRIPTIONS, Block, InputError, bad_summary, find_input_files, parse_record, read_blocks, split_lines,
)
from megatron.training.data.long_text import tokenize_texts
from megatron.training.errors import os_errors_as_output_errors, sigterm_as_exit
from megatron.training.fileio import sweep_stale_temps

_SPLIT_CHUNK_CHARS = 1_000_000  # Megatron-LM splits sentences in pieces of this many characters


@dataclass
class InputAndTokenizerConfig:
    """What every jsonl -> indexed-dataset job needs: input, output, tokenizer, workers, bad-input policy."""

    input: str
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    workers: int = 1
    strict: bool = False
    block_bytes: int = 1 << 20
    max_bad_reports: int = 10


def run_data_tool(args, config_cls, run, report_text) -> None:
    """The command-line body of the data tools: the parsed flags become a
    `config_cls`, SIGTERM stops the run like Ctrl-C (partial outputs are
    removed), and the report goes to stderr. Input errors propagate as
    UserErrors, and a failed write (a full disk, a read-only folder) becomes
    one: the entry point prints them in one line (errors.run_main)."""

    fields = set(config_cls.__dataclass_fields__)
    cfg = config_cls(**{k: v for k, v in vars(args).items() if k in fields})
    with sigterm_as_exit("stopped by signal {signum}; partial outputs removed"), \
            os_errors_as_output_errors("partial outputs removed"):
        report = run(cfg)
    print(report_text(report), file=sys.stderr)


@dataclass
class PreprocessConfig(InputAndTokenizerConfig):
    legacy_tokenizer: bool = False
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    json_format: str = "keys"
    split_sentences: bool = False
    keep_newlines: bool = False
    lang: str = "english"
    append_eod: bool = False
    partitions: int = 1
    log_interval: int = 1000

    @property
    def keys(self) -> List[str]:
        return ["text"] if self.json_format == "title_content" else list(self.json_keys)

    @property
    def level(self) -> str:
        return "sentence" if self.split_sentences else "document"

    def output_name(self, key: str) -> str:
        return f"{self.output_prefix}_{key}_{self.level}"


@dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    lines: int = 0
    bad: Dict[str, int] = field(default_factory=dict)
    bad_examples: Dict[str, List[Tuple[str, int]]] = field(default_factory=dict)
    startup_s: float = 0.0
    elapsed_s: float = 0.0
    outputs: List[str] = field(default_factory=list)
    damaged: List[str] = field(default_factory=list)  # input files read only up to damage (jsonl_reader)
    # why a line can be skipped -> its description, in report order; other
    # record kinds (SFT) replace the jsonl reader's own
    reasons: Dict[str, str] = field(default_factory=lambda: dict(BAD_DESCRIPTIONS))

    def describe(self, reason: str) -> str:
        return self.reasons.get(reason, reason)

    def text(self) -> str:
        """The summary."""
        rate = self.documents / self.elapsed_s if self.elapsed_s else 0.0
        mbs = self.bytes / 1e6 / self.elapsed_s if self.elapsed_s else 0.0
        out = [
            f"documents {self.documents:,}   tokens {self.tokens:,}   input {self.bytes / 1e6:,.1f} MB "
            f"in {self.elapsed_s:.1f} s (start-up {self.startup_s:.2f} s): {rate:,.0f} docs/s, {mbs:.2f} MB/s",
            f"skipped lines {sum(self.bad.values()):,} of {self.lines:,}",
        ]
        summary = bad_summary(self.bad, self.bad_examples, self.reasons)
        if summary:
            out.append(summary)
        out += [f"warning: {d}" for d in self.damaged]
        out += [f"wrote {p}" for p in self.outputs]
        return "\n".join(out)


# ---- worker side -------------------------------------------------------------

_WORKER: dict = {}


def _build_tokenizer(cfg: PreprocessConfig):
    from megatron.training.tokenizer import build_tokenizer

    return build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file, cfg.merge_file,
                           cfg.vocab_size, legacy=cfg.legacy_tokenizer)


def _init_worker(cfg: PreprocessConfig) -> None:
    # the main process handles Ctrl-C and SIGTERM (it terminates the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # the worker count is the parallelism: keep each tokenizer on one thread
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("cfg") is not cfg:  # not inherited through fork
        _WORKER["tokenizer"] = _build_tokenizer(cfg)
    if cfg.split_sentences:
        from megatron.training.data.sentence_split import build_splitter

        _WORKER["splitter"] = build_splitter(cfg.lang, cfg.keep_newlines)
    _WORKER["cfg"] = cfg


def _sentences(value, splitter) -> List[str]:
    if isinstance(value, list):
        return value
    if splitter is None:
        return [value]
    return [s for i in range(0, len(value), _SPLIT_CHUNK_CHARS) for s in splitter(value[i:i + _SPLIT_CHUNK_CHARS])]


def _tokenize_documents(tok, documents: List[List[str]], dtype) -> list:
    """Per document (a list of sentences), the ids of its non-empty
    sentences; None for a document the tokenizer rejects (TokenizerInputError).
    One batch call for all; only when it fails, document by document."""
    from megatron.training.tokenizer import TokenizerInputError

    try:
        flat = tokenize_texts(tok, [s for doc in documents for s in doc], dtype) if documents else []
    except TokenizerInputError:
        if len(documents) == 1:
            return [None]
        return [ids for doc in documents for ids in _tokenize_documents(tok, [doc], dtype)]
    out, pos = [], 0
    for doc in documents:
        out.append([ids for ids in flat[pos:pos + len(doc)] if len(ids)])
        pos += len(doc)
    return out


def _flat_ids(sequences: list, dtype, n: int) -> np.ndarray:
    """The sequences' ids (lists, or numpy arrays for long texts) as one array of `n` ids."""
    if any(isinstance(s, np.ndarray) for s in sequences):
        return np.concatenate([np.asarray(s, dtype=dtype) for s in sequences]) if sequences else np.zeros(0, dtype)
    return np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=n)


def encode_block(block: Block) -> dict:
    """Parse and tokenize one block; the result holds, per partition and key,
    (tokens, sequence lengths, sequences per document) as numpy arrays."""
    cfg: PreprocessConfig = _WORKER["cfg"]
    tok, splitter = _WORKER["tokenizer"], _WORKER.get("splitter")
    dtype = optimal_dtype(tok.vocab_size)
    bad: List[Tuple[str, int]] = []
    good: List[Tuple[int, Dict]] = []  # (line index within block, texts by key)
    lines = split_lines(block.data)
    for i, line in enumerate(lines):
        rec = parse_record(line, cfg.keys, cfg.json_format)
        if isinstance(rec, str):
            bad.append((rec, block.first_line + i))
        else:
            good.append((i, rec))

    # tokenize every sentence of every key with one batch call per key
    per_key = {key: _tokenize_documents(tok, [_sentences(rec[key], splitter) for _, rec in good], dtype)
               for key in cfg.keys}

    parts = [{key: ([], [], []) for key in cfg.keys} for _ in range(cfg.partitions)]
    documents = tokens = 0
    for d, (i, _) in enumerate(good):
        if any(per_key[key][d] is None for key in cfg.keys):
            bad.append(("bad_tokens", block.first_line + i))
            continue
        if any(not per_key[key][d] for key in cfg.keys):
            bad.append(("empty", block.first_line + i))
            continue
        part = parts[(block.first_index + i) % cfg.partitions]
        documents += 1
        for key in cfg.keys:
            seqs = per_key[key][d]
            lists, lengths, counts = part[key]
            lists.extend(seqs)
            lengths.extend(len(s) for s in seqs)
            if cfg.append_eod:
                lists.append([tok.eod])
                lengths[-1] += 1
            counts.append(len(seqs))
    out_parts = []
    for part in parts:
        arrays = {}
        for key, (lists, lengths, counts) in part.items():
            n = sum(lengths)
            tokens += n
            arrays[key] = (_flat_ids(lists, dtype, n), np.asarray(lengths, dtype=np.int32),
                           np.asarray(counts, dtype=np.int64))
        out_parts.append(arrays)
    bad.sort(key=lambda b: b[1])
    return {"path": block.path, "bad": bad, "lines": len(lines), "bytes": len(block.data),
            "documents": documents, "tokens": tokens, "parts": out_parts}


# ---- main process ------------------------------------------------------------


def preprocess(cfg: PreprocessConfig, log=None) -> Report:
    """Run the whole conversion; returns the report. On any error (bad input
    with `strict`, Ctrl-C, SIGTERM) every partial output is removed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    files = find_input_files(cfg.input)
    if cfg.partitions < 1 or cfg.workers < 1:
        raise InputError("--workers and --partitions must be at least 1")
    tok = _build_tokenizer(cfg)
    if cfg.append_eod:
        tok.eod  # a tokenizer without an end-of-document token fails here, before any work
    dtype = optimal_dtype(tok.vocab_size)
    if cfg.split_sentences:
        from megatron.training.data.sentence_split import splitter_description

        log(f"splitting sentences with the {splitter_description(cfg.lang)}")
    _WORKER.update(cfg=cfg, tokenizer=tok)  # inherited by forked workers

    writers = _open_writers(cfg, dtype, log)
    report = Report()
    results = None
    try:
        results = encoded_blocks(files, cfg.block_bytes, cfg.workers, encode_block, _init_worker, (cfg,),
                                 None if cfg.strict else report.damaged)
        report.startup_s = time.time() - start
        t0 = time.time()
        next_log = cfg.log_interval
        for result in results:
            _account(cfg, report, result, log)
            for p, arrays in enumerate(result["parts"]):
                for key, (tokens, lengths, counts) in arrays.items():
                    if counts.size:
                        writers[p][key].add_documents(tokens, lengths, counts)
            if cfg.log_interval and report.documents >= next_log:
                el = time.time() - t0
                log(f"Processed {report.documents:,} documents ({report.documents / el:,.0f} docs/s, "
                    f"{report.bytes / 1e6 / el:.2f} MB/s).")
                next_log = (report.documents // cfg.log_interval + 1) * cfg.log_interval
        require_documents(cfg, report)
        for message in report.damaged:
            log(f"warning: {message}")
        report.outputs = _finalize(cfg, writers, dtype)
    except BaseException:
        if results is not None:
            results.close()
        for per_key in writers:
            for w in per_key.values():
                w.abort()
        raise
    report.elapsed_s = time.time() - start
    return report


def require_documents(cfg: InputAndTokenizerConfig, report: Report) -> None:
    """An input without one usable document is an error, not an empty dataset
    that fails only when training starts."""
    if report.documents == 0:
        skipped = sum(report.bad.values())
        raise InputError(f"--input {cfg.input} has no usable document ({report.lines:,} lines, {skipped:,} skipped"
                         f"{': see the reasons above' if skipped else ''}): fix the input, or check --json-keys "
                         "and --tokenizer-type")


class MaskedDatasets:
    """Token ids and their loss mask as two indexed datasets with the same documents (SFT and preference
    preprocessing). Used as a context manager: on any failure inside the block the workers' results are
    closed (`self.results`, when set) and both partial datasets are removed."""

    def __init__(self, prefixes: Tuple[str, str], vocab_size: int):
        self.writers = [IndexedDatasetWriter(prefixes[0], optimal_dtype(vocab_size)),
                        IndexedDatasetWriter(prefixes[1], np.uint8)]
        self.results = None

    def add(self, result: dict, documents: np.ndarray) -> None:
        """An encoded block's "ids" and "mask" over its "lengths", `documents` sequences per document."""
        for writer, key in zip(self.writers, ("ids", "mask")):
            writer.add_documents(result[key], result["lengths"], documents)

    def finalize(self) -> List[str]:
        return [p for w in self.writers for p in w.finalize()]

    def __enter__(self) -> "MaskedDatasets":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            if self.results is not None:
                self.results.close()
            for w in self.writers:
                w.abort()


def encoded_blocks(files: Sequence[str], block_bytes: int, workers: int, encode, initializer, initargs,
                   damaged: Optional[List[str]] = None):
    """An iterator of `encode(block)` for every block of `files`, in input
    order, computed by `workers` processes (started with
    `initializer(*initargs)`) with at most a few blocks in flight. The pool
    starts here, not at the first block, so a caller timing its start-up
    counts it; `close()` stops the workers, whether iteration began or not.
    Damaged compressed inputs are reported into `damaged` (None: an error)."""
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)
    return _PoolResults(pool, _ordered_results(pool, read_blocks(files, block_bytes, damaged), workers, encode))


class _PoolResults:
    """Iterates a generator of pool results; close() also stops the pool,
    which the generator's own clean-up would not if it never started."""

    def __init__(self, pool, results):
        self._pool, self._results = pool, results

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        self._pool.terminate()


def _ordered_results(pool, blocks, workers: int, encode):
    try:
        inflight: deque = deque()
        while True:
            while len(inflight) < 2 * workers + 2:
                block = next(blocks, None)
                if block is None:
                    break
                inflight.append(pool.apply_async(encode, (block,)))
            if not inflight:
                break
            yield inflight.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _account(cfg: PreprocessConfig, report: Report, result: dict, log) -> None:
    report.lines += result["lines"]
    report.bytes += result["bytes"]
    report.documents += result["documents"]
    report.tokens += result["tokens"]
    for reason, line in result["bad"]:
        where = f"{result['path']}:{line}"
        if cfg.strict:
            raise InputError(f"{where}: line {report.describe(reason)} (--strict stops here; "
                             "drop --strict to skip and count such lines)")
        n = report.bad.get(reason, 0) + 1
        report.bad[reason] = n
        report.bad_examples.setdefault(reason, []).append((result["path"], line)) if n <= 3 else None
        if sum(report.bad.values()) <= cfg.max_bad_reports:
            log(f"skipping {where}: {report.describe(reason)}")


def _open_writers(cfg: PreprocessConfig, dtype, log) -> List[Dict[str, IndexedDatasetWriter]]:
    """One writer per key (per partition with --partitions); a failure while
    opening them removes what the ones already open made."""
    folder = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(folder, exist_ok=True)
    for key in cfg.keys:  # what killed runs left, partition shards included
        sweep_stale_temps(folder, os.path.basename(cfg.output_name(key)) + ".", log)
    # partition shards live under temporary names until merged into the output
    prefixes = ([{k: cfg.output_name(k) for k in cfg.keys}] if cfg.partitions == 1 else
                [{k: temp_name(f"{cfg.output_name(k)}.part{p}") for k in cfg.keys} for p in range(cfg.partitions)])
    writers: List[Dict[str, IndexedDatasetWriter]] = []
    try:
        for per_key in prefixes:
            writers.append({})
            for key, prefix in per_key.items():
                writers[-1][key] = IndexedDatasetWriter(prefix, dtype)
    except BaseException:
        for w in (w for per_key in writers for w in per_key.values()):
            w.abort()
        raise
    return writers


def _finalize(cfg: PreprocessConfig, writers, dtype) -> List[str]:
    if cfg.partitions == 1:
        return [path for w in writers[0].values() for path in w.finalize()]
    outputs = []
    for key in cfg.keys:
        shards = [per_key[key] for per_key in writers]
        for w in shards:
            w.finalize()
        merged = IndexedDatasetWriter(cfg.output_name(key), dtype)
        try:
            for w in shards:
                merged.add_dataset(w.prefix)
            outputs += merged.finalize()
        except BaseException:
            merged.abort()
            raise
        finally:
            for w in shards:
                for ext in (".bin", ".idx"):
                    if os.path.exists(w.prefix + ext):
                        os.remove(w.prefix + ext)
    return outputs
