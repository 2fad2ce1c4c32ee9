"""The generation loop: documents -> prompts -> teacher -> filters -> shards.

    report = generate_synthetic_data(documents, cutter, teacher, cfg)

Prompts are sent to the teacher `batch_size` at a time. A batch that raises is
retried prompt by prompt, each up to `max_retries` more times; a prompt that
still fails is logged to OUT/failed.jsonl and left undone, so the next run
retries it (the run's exit status says so). Every `docs_per_shard` handled
documents make one shard, committed atomically (see output_dir.py).
"""

import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from megatron.training.distill.documents import Document, Prompt, PrefixCutter
from megatron.training.distill.filters import FILTER_REASONS, FilterConfig, reject_reason
from megatron.training.distill.output_dir import OutputDir
from megatron.training.distill.teacher import Generation


@dataclass
class GenerateConfig:
    output_dir: str
    teacher_name: str
    source: str = ""  # the input, recorded with every output
    batch_size: int = 16
    docs_per_shard: int = 1000
    max_retries: int = 2
    max_docs: Optional[int] = None  # stop after this many new documents (None: all)
    log_interval_s: float = 30.0
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class RunReport:
    handled: int = 0  # documents given to the teacher and settled (kept or filtered) in this run
    kept: int = 0
    filtered: Dict[str, int] = field(default_factory=dict)
    failed: int = 0
    generated_tokens: int = 0
    already_done: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # source documents that gave no prompt
    shards: List[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    still_failed: int = 0  # over all runs, after this one

    def rates(self) -> Tuple[float, float]:
        el = max(self.elapsed_s, 1e-9)
        return self.handled / el, self.generated_tokens / el

    def text(self) -> str:
        docs_s, tok_s = self.rates()
        lines = [f"documents {self.handled:,} in {self.elapsed_s:.1f} s: {docs_s:,.2f} docs/s, "
                 f"generated tokens {self.generated_tokens:,} ({tok_s:,.1f} tokens/s)",
                 f"kept {self.kept:,}   filtered {sum(self.filtered.values()):,}   failed {self.failed:,}   "
                 f"done by earlier runs {self.already_done:,}   shards written {len(self.shards)}"]
        lines += [f"  filtered {r:<12}{self.filtered[r]:>10,}" for r in FILTER_REASONS if self.filtered.get(r)]
        lines += [f"  no prompt {r:<15}{n:>10,}" for r, n in sorted(self.skipped.items())]
        if self.still_failed:
            lines.append(f"{self.still_failed:,} documents failed after every retry; they are listed in failed.jsonl "
                         "and the next run with the same command retries them")
        return "\n".join(lines)


def prompt_seed(base: int, doc_id: str) -> int:
    """A per-document seed that does not depend on batching or on the run."""
    return (base + zlib.crc32(doc_id.encode())) % (1 << 31)


def generate_with_retries(teacher, prompts: List[Prompt], seeds: List[int], max_retries: int, log
                          ) -> Tuple[List[Optional[Generation]], Dict[int, Tuple[int, str]]]:
    """Generations (None where failed) and {index: (attempts, last error)} for the failures."""
    try:
        return teacher.generate([p.token_ids for p in prompts], seeds), {}
    except Exception as e:  # noqa: BLE001 - any teacher error is retried, then logged
        log(f"batch of {len(prompts)} failed ({type(e).__name__}: {e}); retrying its prompts one by one")
    results: List[Optional[Generation]] = [None] * len(prompts)
    errors: Dict[int, Tuple[int, str]] = {}
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        for attempt in range(1, max_retries + 1):
            try:
                results[i] = teacher.generate([p.token_ids], [seed])[0]
                errors.pop(i, None)
                break
            except Exception as e:  # noqa: BLE001
                errors[i] = (attempt + 1, f"{type(e).__name__}: {e}")
                log(f"document {p.doc_id}: attempt {attempt + 1} failed ({errors[i][1]})")
    return results, errors


class _Run:
    def __init__(self, cutter: PrefixCutter, teacher, cfg: GenerateConfig, out: OutputDir, log):
        self.cutter, self.teacher, self.cfg, self.out, self.log = cutter, teacher, cfg, out, log
        self.tok = cutter.tok
        self.report = RunReport()
        self.shard = None
        self.start = self.last_log = time.time()
        self.sampling = teacher.sampling.as_dict()

    def record(self, p: Prompt, g: Generation, seed: int) -> dict:
        prefix_ids = p.token_ids[len(self.cutter.bos):]
        # decoding prefix and continuation together keeps the space between them
        # (sentencepiece drops a leading one when a piece is decoded alone)
        full = self.tok.decode(prefix_ids + g.token_ids, skip_special_tokens=True)
        head = self.tok.decode(prefix_ids, skip_special_tokens=True)
        continuation = full[len(head):] if full.startswith(head) else \
            self.tok.decode(g.token_ids, skip_special_tokens=True)
        return {"id": p.doc_id, "text": p.prefix + continuation, "prefix": p.prefix, "continuation": continuation,
                "prefix_tokens": p.prefix_tokens, "continuation_tokens": len(g.token_ids),
                "finish_reason": g.finish_reason, "teacher": self.cfg.teacher_name, "backend": self.teacher.backend,
                "sampling": dict(self.sampling, seed=seed), "source": self.cfg.source}

    def run_batch(self, prompts: List[Prompt]) -> None:
        seeds = [prompt_seed(self.teacher.sampling.seed, p.doc_id) for p in prompts]
        gens, errors = generate_with_retries(self.teacher, prompts, seeds, self.cfg.max_retries, self.log)
        r = self.report
        for i, (p, g, seed) in enumerate(zip(prompts, gens, seeds)):
            if g is None:
                attempts, error = errors[i]
                self.out.log_failure({"id": p.doc_id, "attempts": attempts, "error": error, "time": time.time()})
                r.failed += 1
                continue
            if self.shard is None:
                self.shard = self.out.open_shard()
            rec = self.record(p, g, seed)
            self.shard.generated_tokens += len(g.token_ids)
            r.generated_tokens += len(g.token_ids)
            r.handled += 1
            reason = reject_reason(rec["continuation"], g.token_ids, self.cfg.filters)
            if reason:
                self.shard.drop(p.doc_id, reason)
                r.filtered[reason] = r.filtered.get(reason, 0) + 1
            else:
                self.shard.add(rec)
                r.kept += 1
            if len(self.shard.ids) >= self.cfg.docs_per_shard:
                self.commit()
        if time.time() - self.last_log >= self.cfg.log_interval_s:
            self.progress()

    def commit(self) -> None:
        self.shard.commit()
        self.report.shards.append(self.shard.final)
        self.shard = None
        self.progress()

    def progress(self) -> None:
        r = self.report
        r.elapsed_s = time.time() - self.start
        docs_s, tok_s = r.rates()
        self.log(f"documents {r.handled:,} ({docs_s:,.2f} docs/s)   generated tokens {r.generated_tokens:,} "
                 f"({tok_s:,.1f} tokens/s)   kept {r.kept:,}   filtered {sum(r.filtered.values()):,}   "
                 f"failed {r.failed:,}   shards {len(r.shards)}")
        self.last_log = time.time()


def generate_synthetic_data(documents: Iterable[Document], cutter: PrefixCutter, teacher, cfg: GenerateConfig,
                            log=None) -> RunReport:
    """Generate continuations for every document not yet done in `cfg.output_dir`."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = OutputDir(cfg.output_dir, log)
    try:
        # a resumed run must cut, sample and filter as the first did (batch size, backend and parallelism may change)
        out.check_config({"source": cfg.source, "teacher": cfg.teacher_name, "prefix": asdict(cutter.cfg),
                          "sampling": teacher.sampling.as_dict(), "filters": asdict(cfg.filters)})
        done = out.recover()
        run = _Run(cutter, teacher, cfg, out, log)
        pending: List[Prompt] = []
        taken = 0
        try:
            for doc in documents:
                if doc.id in done:
                    run.report.already_done += 1
                    continue
                if cfg.max_docs is not None and taken >= cfg.max_docs:
                    break
                prompt = cutter.cut(doc)
                if prompt is None:
                    continue
                taken += 1
                pending.append(prompt)
                if len(pending) == cfg.batch_size:
                    run.run_batch(pending)
                    pending = []
            if pending:
                run.run_batch(pending)
            if run.shard is not None:
                run.commit()
        except BaseException:
            if run.shard is not None:
                run.shard.abort()
            raise
        report = run.report
        report.elapsed_s = time.time() - run.start
        report.skipped = dict(cutter.stats.skipped)
        summary = totals(out)
        report.still_failed = len(summary["still_failed"])
        out.write_json("report.json", summary)
        return report
    finally:
        out.close()


def totals(out: OutputDir) -> dict:
    """Counts over every committed shard of the folder (all runs)."""
    entries = out.entries()
    filtered: Dict[str, int] = {}
    for e in entries:
        for k, v in e["filtered"].items():
            filtered[k] = filtered.get(k, 0) + v
    done = {i for e in entries for i in e["ids"]}
    return {"documents": len(done), "kept": sum(e["kept"] for e in entries), "filtered": filtered,
            "generated_tokens": sum(e["generated_tokens"] for e in entries), "shards": len(entries),
            "still_failed": sorted(out.still_failed(done))}
