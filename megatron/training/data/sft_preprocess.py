"""SFT jsonl -> two parallel indexed datasets, one document per example:

    {prefix}_text_document.bin/.idx        token ids (what GPTDataset would read too)
    {prefix}_loss_mask_document.bin/.idx   uint8, 1 where the token is part of a response

Same machinery as tools/preprocess_data.py: blocks of whole lines read by
the main process, parsed and tokenized by worker processes, bad lines counted
and reported as file:line, outputs written under temporary names until
complete. The tokenizer is built with megatron-core semantics (no special
token added implicitly); the template adds BOS/EOS itself (sft_templates.py).
"""

import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from megatron.training.data.indexed_writer import optimal_dtype
from megatron.training.data.jsonl_reader import Block, InputError, find_input_files, split_lines
from megatron.training.data.preprocess import (
    InputAndTokenizerConfig, MaskedDatasets, Report, _account, encoded_blocks,
)
from megatron.training.data.sft_formats import SFT_BAD_REASONS, BadRecord, parse_sft_line
from megatron.training.data.sft_templates import SFTEncoder

TOKENS_SUFFIX = "_text_document"
MASK_SUFFIX = "_loss_mask_document"


@dataclass
class SFTPreprocessConfig(InputAndTokenizerConfig):
    sft_format: str = "auto"
    chat_template: str = "auto"


def sft_dataset_prefixes(prefix: str):
    """(tokens prefix, loss-mask prefix) of a preprocessed SFT dataset."""
    return prefix + TOKENS_SUFFIX, prefix + MASK_SUFFIX


def build_sft_encoder(cfg: SFTPreprocessConfig) -> SFTEncoder:
    from megatron.training.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file, cfg.merge_file,
                          cfg.vocab_size, legacy=False)
    return SFTEncoder(tok, cfg.chat_template)


_WORKER: dict = {}


def _init_worker(cfg: SFTPreprocessConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("cfg") is not cfg:  # not inherited through fork
        _WORKER.update(cfg=cfg, encoder=build_sft_encoder(cfg))


def encode_sft_block(block: Block) -> dict:
    """Parse and encode one block: flat ids, per-example lengths, flat mask."""
    cfg: SFTPreprocessConfig = _WORKER["cfg"]
    encoder: SFTEncoder = _WORKER["encoder"]
    bad, segment_lists, line_numbers = [], [], []
    lines = split_lines(block.data)
    for i, line in enumerate(lines):
        conv = parse_sft_line(line, cfg.sft_format)
        try:
            if isinstance(conv, str):
                raise BadRecord(conv)
            segment_lists.append(encoder.segments(conv))
            line_numbers.append(block.first_line + i)
        except BadRecord as e:
            bad.append((e.reason, block.first_line + i))
    encoded = _encode_records(encoder, segment_lists, line_numbers, bad)
    lengths = np.asarray([len(ids) for ids, _ in encoded], dtype=np.int32)
    n = int(lengths.sum())
    dtype = optimal_dtype(encoder.tokenizer.vocab_size)
    ids = np.fromiter(itertools.chain.from_iterable(i for i, _ in encoded), dtype=dtype, count=n)
    mask = np.fromiter(itertools.chain.from_iterable(m for _, m in encoded), dtype=np.uint8, count=n)
    return {"path": block.path, "bad": bad, "lines": len(lines), "bytes": len(block.data),
            "documents": len(encoded), "tokens": n, "ids": ids, "lengths": lengths, "mask": mask}


def _encode_records(encoder: SFTEncoder, segment_lists: list, line_numbers: list, bad: list) -> list:
    """`encoder.encode_many(segment_lists)`; when the tokenizer rejects a text,
    record by record, the rejected ones added to `bad` as ("bad_tokens", line)."""
    from megatron.training.tokenizer import TokenizerInputError

    try:
        return encoder.encode_many(segment_lists)
    except TokenizerInputError:
        pass
    out = []
    for segments, line in zip(segment_lists, line_numbers):
        try:
            out.append(encoder.encode_many([segments])[0])
        except TokenizerInputError:
            bad.append(("bad_tokens", line))
    bad.sort(key=lambda b: b[1])
    return out


def preprocess_sft(cfg: SFTPreprocessConfig, log=None) -> Report:
    """Run the conversion; returns the report (with `response_tokens` set).
    On any error every partial output is removed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    files = find_input_files(cfg.input)
    if cfg.workers < 1:
        raise InputError("--workers must be at least 1")
    encoder = build_sft_encoder(cfg)
    log(f"SFT records ({cfg.sft_format}) with {encoder.description}")
    _WORKER.update(cfg=cfg, encoder=encoder)  # inherited by forked workers
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    report = Report(reasons=SFT_BAD_REASONS)
    report.response_tokens = 0
    with MaskedDatasets(sft_dataset_prefixes(cfg.output_prefix), encoder.tokenizer.vocab_size) as out:
        out.results = encoded_blocks(files, cfg.block_bytes, cfg.workers, encode_sft_block, _init_worker, (cfg,),
                                     None if cfg.strict else report.damaged)
        report.startup_s = time.time() - start
        for result in out.results:
            _account(cfg, report, result, log)
            report.response_tokens += int(result["mask"].sum())
            out.add(result, np.ones(result["documents"], dtype=np.int64))
        if report.documents == 0:
            raise InputError(f"--input {cfg.input} has no usable record ({sum(report.bad.values())} bad lines): "
                             "fix the records the report lists, or give --sft-format")
        for message in report.damaged:
            log(f"warning: {message}")
        report.outputs = out.finalize()
    report.elapsed_s = time.time() - start
    return report


def sft_report_text(report: Report) -> str:
    share = report.response_tokens / report.tokens if report.tokens else 0.0
    return (report.text()
            + f"\nresponse tokens (loss mask 1) {report.response_tokens:,} of {report.tokens:,} ({share:.1%})")
