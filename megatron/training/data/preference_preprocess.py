"""Preference jsonl -> two parallel indexed datasets in which every pair is one
document of two sequences, chosen then rejected:

    {prefix}_pair_text_document.bin/.idx        token ids
    {prefix}_pair_loss_mask_document.bin/.idx   uint8, 1 on the last response (what the log-probs sum over)

Each side is the SFT encoding of the conversation with that response
(sft_templates.py: the same template, segment by segment), with the loss mask
kept on the final response only: the prompt, history turns included, is
context, as in TRL and LLaMA-Factory. Both sides share the prompt's ids.

Bad input is refused, not skipped: the first record that is not a valid pair
(missing chosen/rejected, identical responses, an empty response, a pair
longer than --seq-length + 1 tokens, ...) stops the run with one line naming
its file and line, and nothing is written. Over-long pairs are refused by
default rather than truncated: a preference decided by a response's end would
be lost silently. --truncation-mode keep_start / keep_end truncates as TRL's
DPO collator does (each side, prompt and response together, to its first /
last seq_length + 1 tokens, the loss mask with it); a pair left with no
response token on a side (its prompt fills the window) is dropped, as TRL
drops pairs whose prompt fills max_length, and the report counts both.
"""

import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np

from megatron.training.data.indexed_writer import optimal_dtype
from megatron.training.data.jsonl_reader import Block, InputError, find_input_files, split_lines
from megatron.training.data.preference_formats import BadPair, PreferencePair, parse_preference_line
from megatron.training.data.preprocess import InputAndTokenizerConfig, MaskedDatasets, Report, encoded_blocks
from megatron.training.data.sft_formats import BadRecord
from megatron.training.data.sft_templates import Rendered, Segments, SFTEncoder

TOKENS_SUFFIX = "_pair_text_document"
MASK_SUFFIX = "_pair_loss_mask_document"


@dataclass
class PreferencePreprocessConfig(InputAndTokenizerConfig):
    chat_template: str = "auto"
    seq_length: Optional[int] = None  # a pair fits when each side has at most seq_length + 1 tokens
    truncation_mode: Optional[str] = None  # None: refuse over-long pairs; keep_start / keep_end: TRL's truncation


# --truncation-mode -> the tokens of a side that stay (TRL's DataCollatorForPreference slices)
TRUNCATION = {"keep_start": lambda seq, window: seq[:window], "keep_end": lambda seq, window: seq[-window:]}


def preference_dataset_prefixes(prefix: str) -> Tuple[str, str]:
    """(tokens prefix, loss-mask prefix) of a preprocessed preference dataset."""
    return prefix + TOKENS_SUFFIX, prefix + MASK_SUFFIX


def is_preference_prefix(prefix: str) -> bool:
    return os.path.exists(prefix + TOKENS_SUFFIX + ".idx")


def pair_segments(encoder: SFTEncoder, pair: PreferencePair) -> List[Union[Segments, Rendered]]:
    """[chosen, rejected] as SFTEncoder.encode_many takes them, the loss on the
    final response only: a built-in template's segments, or the tokenizer's own
    rendering with the character span of its last response."""
    out = []
    for conv in (pair.chosen, pair.rejected):
        full = encoder.segments(conv)
        if isinstance(full, Rendered):
            out.append(Rendered(full.text, full.responses[-1:]))
            continue
        prompt = len(encoder.segments(conv, prompt_only=True))
        out.append([(piece, i >= prompt) for i, (piece, _) in enumerate(full)])
    return out


_WORKER: dict = {}


def _build_encoder(cfg: PreferencePreprocessConfig) -> SFTEncoder:
    from megatron.training.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file, cfg.merge_file,
                          cfg.vocab_size, legacy=False)
    return SFTEncoder(tok, cfg.chat_template)


def _init_worker(cfg: PreferencePreprocessConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("cfg") is not cfg:  # not inherited through fork
        _WORKER.update(cfg=cfg, encoder=_build_encoder(cfg))


def _encode_pair(encoder: SFTEncoder, pair: PreferencePair, window: int, truncation_mode: Optional[str] = None):
    """(((chosen ids, mask), (rejected ids, mask)), truncated?), cut to `window` tokens a side by
    `truncation_mode`; the sides are None when truncation left one with no response token."""
    from megatron.training.tokenizer import TokenizerInputError

    try:
        (chosen, chosen_mask), (rejected, rejected_mask) = encoder.encode_many(pair_segments(encoder, pair))
    except BadRecord as e:
        raise BadPair(e.reason)
    except TokenizerInputError:
        raise BadPair("bad_tokens")
    if chosen == rejected:
        raise BadPair("identical", "their token ids are the same")
    longest = max(len(chosen), len(rejected))
    if longest > window and truncation_mode is None:
        raise BadPair("too_long", f"{len(chosen)} + {len(rejected)} tokens; each side may have at most "
                                  f"--seq-length + 1 = {window}: raise --seq-length to {longest - 1}, shorten "
                                  "the record, or pass --truncation-mode keep_start|keep_end")
    sides = [(chosen, chosen_mask), (rejected, rejected_mask)]
    if longest <= window:
        return sides, False
    cut = TRUNCATION[truncation_mode]
    sides = [(cut(ids, window), cut(mask, window)) for ids, mask in sides]
    return (sides if all(any(mask) for _, mask in sides) else None), True


def encode_pair_block(block: Block) -> dict:
    """Parse and encode one block; stops at its first bad record."""
    cfg: PreferencePreprocessConfig = _WORKER["cfg"]
    encoder: SFTEncoder = _WORKER["encoder"]
    sides, bad, truncated, dropped = [], None, 0, 0
    lines = split_lines(block.data)
    window = cfg.seq_length + 1
    for i, line in enumerate(lines):
        try:
            pair = parse_preference_line(line)
            if pair is None:
                continue
            encoded, cut = _encode_pair(encoder, pair, window, cfg.truncation_mode)
            if encoded is None:
                dropped += 1
                continue
            truncated += cut
            sides += encoded
        except BadPair as e:
            bad = (block.first_line + i, e.describe())
            break
    lengths = np.asarray([len(ids) for ids, _ in sides], dtype=np.int32)
    n = int(lengths.sum())
    dtype = optimal_dtype(encoder.tokenizer.vocab_size)
    return {"path": block.path, "bad": bad, "lines": len(lines), "bytes": len(block.data), "pairs": len(sides) // 2,
            "truncated": truncated, "dropped": dropped, "tokens": n, "lengths": lengths,
            "ids": np.fromiter(itertools.chain.from_iterable(i for i, _ in sides), dtype=dtype, count=n),
            "mask": np.fromiter(itertools.chain.from_iterable(m for _, m in sides), dtype=np.uint8, count=n)}


def preprocess_preference(cfg: PreferencePreprocessConfig, log=None) -> Report:
    """Run the conversion; the report's `documents` counts pairs. Any bad
    record raises InputError (FILE:LINE: what, and the fix) and every partial
    output is removed."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    if cfg.seq_length is None or cfg.seq_length < 1:
        raise InputError("--seq-length is required: the training sequence length, so pairs that do not fit are "
                         "refused here with their line")
    files = find_input_files(cfg.input)
    if cfg.workers < 1:
        raise InputError("--workers must be at least 1")
    encoder = _build_encoder(cfg)
    log(f"preference pairs with {encoder.description}")
    _WORKER.update(cfg=cfg, encoder=encoder)  # inherited by forked workers
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    report = Report()
    report.response_tokens = report.truncated = report.dropped = 0
    with MaskedDatasets(preference_dataset_prefixes(cfg.output_prefix), encoder.tokenizer.vocab_size) as out:
        out.results = encoded_blocks(files, cfg.block_bytes, cfg.workers, encode_pair_block, _init_worker, (cfg,))
        report.startup_s = time.time() - start
        for result in out.results:
            if result["bad"] is not None:
                line, why = result["bad"]
                raise InputError(f"{result['path']}:{line}: {why}: fix or remove the record (nothing was written)")
            report.lines += result["lines"]
            report.bytes += result["bytes"]
            report.documents += result["pairs"]
            report.tokens += result["tokens"]
            report.response_tokens += int(result["mask"].sum())
            report.truncated += result["truncated"]
            report.dropped += result["dropped"]
            out.add(result, np.full(result["pairs"], 2, dtype=np.int64))  # a pair: one document of two sequences
        if report.documents == 0:
            raise InputError(f"--input {cfg.input} holds no preference pair" + (
                f" that fits --seq-length {cfg.seq_length} ({report.dropped:,} dropped: their prompts fill the "
                "window): raise --seq-length" if report.dropped else
                ": give a jsonl file of {prompt, chosen, rejected} records"))
        report.outputs = out.finalize()
    report.elapsed_s = time.time() - start
    return report


def preference_report_text(report: Report) -> str:
    cut = (f"   truncated {report.truncated:,}, dropped {report.dropped:,} (prompt fills the window)"
           if report.truncated or report.dropped else "")
    return (f"pairs {report.documents:,}{cut}   tokens {report.tokens:,} (response tokens {report.response_tokens:,})   "
            f"input {report.bytes / 1e6:,.1f} MB in {report.elapsed_s:.1f} s\n"
            + "\n".join(f"wrote {p}" for p in report.outputs))
