"""Perplexity of a token stream at one or more context lengths.

    tokens = read_indexed_tokens(prefix, max_tokens)   # or read_jsonl_tokens(path, tokenizer, key)
    row = evaluate_perplexity(lm, tokens, seq_length=4096, stride=4096)   # non-overlapping windows
    row = evaluate_perplexity(lm, tokens, seq_length=32768, stride=256)   # sliding window (PI paper)

The documents are one stream (as the indexed dataset stores them, each ended
by its end-of-document token). A window feeds `seq_length` tokens and predicts
the next token at every position. The first window scores all of them; each
later window starts `stride` tokens after the previous one and scores only the
tokens no window has scored yet, so every token after the first is scored
exactly once, with at least `seq_length - stride` tokens of context (all
earlier tokens near the start). stride = seq_length: non-overlapping windows.

Resume: with a `PartialResults` file every batch of windows is recorded as it
is scored (its summed negative log-likelihood and token count), and a rerun
with the same settings (model, data, lengths, strides, batch size) scores only
the batches not yet there. Totals are always summed from the per-batch
records in window order, so a resumed run gives the same numbers, bit for bit,
as one that was never interrupted.
"""

import hashlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tasks.lm import EvalError, LanguageModel, chunks, document_prefix, encode, require_tokenizer
from tasks.results import PartialResults


def read_indexed_tokens(prefix: str, max_tokens: int = 0) -> np.ndarray:
    """The documents of a megatron-core indexed dataset (PREFIX.bin/.idx), concatenated."""
    import os

    from megatron.training.data.indexed_writer import DatasetFormatError, checked_indexed_dataset

    if not (os.path.isfile(prefix + ".bin") or os.path.isfile(prefix + ".idx")):
        raise EvalError(f"--data-path {prefix}: no {prefix}.bin/.idx; give the prefix without the suffix "
                        "(tools/preprocess_data.py prints it)")
    try:
        dataset = checked_indexed_dataset(prefix)
    except DatasetFormatError as e:
        raise EvalError(f"--data-path {prefix}: {e}")
    parts, total = [], 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i], dtype=np.int64)
        parts.append(doc)
        total += len(doc)
        if max_tokens and total >= max_tokens:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens[:max_tokens] if max_tokens else tokens


def read_jsonl_tokens(path: str, tokenizer, key: str = "text", max_tokens: int = 0) -> np.ndarray:
    """Each record's text tokenized as training data is (the tokenizer's
    document prefix, the text, end-of-document), concatenated."""
    import json

    prefix = document_prefix(tokenizer)
    parts, total = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                raise EvalError(f"{path}:{number}: not a JSON object with a {key!r} string: fix the line or "
                                "choose the field with --json-key")
            ids = prefix + encode(tokenizer, text) + [tokenizer.eod]
            parts.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if max_tokens and total >= max_tokens:
                break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens[:max_tokens] if max_tokens else tokens


def window_plan(num_tokens: int, seq_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """[(begin, end, first_scored)]: the window feeds tokens[begin:end] and
    scores the targets tokens[t] for first_scored <= t <= end."""
    if stride < 1 or stride > seq_length:
        raise EvalError(f"--stride {stride} must be between 1 and --seq-length {seq_length}")
    plan, begin, next_target = [], 0, 1
    while next_target < num_tokens:
        end = min(begin + seq_length, num_tokens - 1)
        plan.append((begin, end, next_target))
        next_target = end + 1
        begin += stride
    return plan


def evaluate_perplexity(lm: LanguageModel, tokens: Sequence[int], seq_length: int, stride: int = 0,
                        batch_size: int = 4, results: Optional[PartialResults] = None) -> Dict[str, float]:
    """{seq_length, stride, windows, tokens, loss (mean nats per token), ppl}.
    With `results`, batches already recorded there are not scored again."""
    stride = stride or seq_length
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if len(tokens) < 2:
        raise EvalError("fewer than 2 tokens to evaluate: give more data (or a larger --max-tokens)")
    if int(tokens.max()) >= lm.vocab_size:
        raise EvalError(f"the data holds token id {int(tokens.max())} but the model's tokenizer has "
                        f"{lm.vocab_size}: the data was prepared with another tokenizer")
    plan = window_plan(len(tokens), seq_length, stride)
    by_length: Dict[int, list] = {}
    for window in plan:
        by_length.setdefault(window[1] - window[0], []).append(window)
    batches = [batch for length in sorted(by_length, reverse=True) for batch in chunks(by_length[length], batch_size)]
    sums = []  # (negative log-likelihood, tokens) per batch, in order
    for number, batch in enumerate(batches):
        key = f"{seq_length}/{stride}/{number}"
        if results is not None and key in results:
            done = results.records[key]
            sums.append((done["nll"], done["tokens"]))
            continue
        inputs = torch.stack([tokens[b:e] for b, e, _ in batch])
        logprobs = lm.log_probs(inputs)
        nll, count = 0.0, 0
        for row, (b, e, first) in enumerate(batch):
            positions = torch.arange(first - 1 - b, e - b)  # input position i predicts token b + i + 1
            targets = tokens[positions + b + 1]
            nll -= float(logprobs[row, positions, targets].double().sum())
            count += len(positions)
        sums.append((nll, count))
        if results is not None:
            results.add([{"key": key, "nll": nll, "tokens": count}])
    total = math.fsum(n for n, _ in sums)
    count = sum(c for _, c in sums)
    loss = total / count
    return {"seq_length": seq_length, "stride": stride, "windows": len(plan), "tokens": count,
            "loss": loss, "ppl": math.exp(min(loss, 700.0))}


def perplexity_table(rows: List[dict]) -> str:
    from tasks.results import markdown_table

    header = ["model", "PI factor", "seq length", "stride", "windows", "tokens", "mean loss", "perplexity"]
    body = [[r.get("model", ""), r.get("interpolation_factor") or 1, r["seq_length"], r["stride"], r["windows"],
             r["tokens"], r["loss"], r["ppl"]] for r in rows]
    return markdown_table(header, body, align="lrrrrrrr")


def run(args, lm: LanguageModel) -> List[dict]:
    """The perplexity task of tasks/main.py: every --seq-length, one table."""
    if args.data_path:
        tokens = read_indexed_tokens(args.data_path, args.max_tokens)
    elif args.jsonl:
        require_tokenizer(lm, "--jsonl")
        tokens = read_jsonl_tokens(args.jsonl, lm.tokenizer, args.json_key, args.max_tokens)
    else:
        raise EvalError("perplexity needs data: --data-path PREFIX (indexed dataset) or --jsonl FILE")
    strides = args.stride or [0]
    if len(strides) not in (1, len(args.seq_length)):
        raise EvalError("give one --stride for all lengths or one per --seq-length")
    strides = [strides[i if len(strides) > 1 else 0] or length for i, length in enumerate(args.seq_length)]
    results = None
    if args.results_file:
        settings = {"task": "perplexity", "model": args.load or args.hf_model, "data": args.data_path or args.jsonl,
                    "tokens": len(tokens), "tokens_sha1": hashlib.sha1(np.ascontiguousarray(tokens)).hexdigest(),
                    "seq_length": args.seq_length, "stride": strides, "micro_batch_size": args.micro_batch_size,
                    "interpolation_factor": lm.interpolation_factor}
        results = PartialResults(args.results_file, settings, lm.is_writer)
    rows = []
    for length, stride in zip(args.seq_length, strides):
        row = evaluate_perplexity(lm, tokens, length, stride, args.micro_batch_size, results)
        row.update(model=args.load or args.hf_model, interpolation_factor=lm.interpolation_factor)
        rows.append(row)
    return rows
