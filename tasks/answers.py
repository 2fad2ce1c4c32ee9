"""Task accuracy of greedy answers: does the model, given a record's prompt,
answer with the record's target? (finetune.py's eval_accuracy, on its
valid_dataset_path.)

Data: the fine-tuning jsonl itself, any format the SFT tools read (FinLoRA's
{"context", "target"}, PandaLLM's {"input", "target"}, Alpaca, chat messages;
--sft-format) or preference pairs ({"prompt", "chosen", "rejected"} and the
other forms of data/preference_formats.py), whose target is the chosen
response. The prompt is rendered and tokenized exactly as preprocessing
rendered it for training (data/sft_templates.py SFTEncoder.encode_prompt, the
same --chat-template), and the target is the record's last assistant turn.

The model continues the prompt greedily (tasks/generation.py greedy_batch,
--micro-batch-size prompts at a time) until it emits
the tokenizer's end-of-document token or a special token that ends the
target's response in training (Llama 3's <|eot_id|>, Qwen's <|im_end|>), or
after --max-new-tokens tokens (default: as many as the target's response has
in training, end-of-turn tokens included, plus EXTRA_TOKENS, so an answer that
runs on past the target shows it). The answer is the text before that stop
token, special tokens left out.

Both texts are normalised (normalise_answer) before comparison: Unicode NFKC,
case folded, every run of white space one space, and white space and the
punctuation . , ; : ! ? " ' removed from both ends (the sentence punctuation a
label may carry: "Positive." is "positive"; inner punctuation, as in
"1,234.5" or "a-b", stays). Reported:
- exact match: the share of records whose normalised answer equals the normalised target;
- contains: the share whose normalised answer contains the normalised target,
  FinLoRA's own comparison (test/test_dataset.py: `target.lower() in answer.lower()`),
  here with this task's normalisation and token budget.
"""

import gzip
import json
import sys
import unicodedata
from dataclasses import dataclass
from typing import List, Tuple

from tasks.generation import greedy_batch
from tasks.lm import EvalError, LanguageModel, chunks, data_tokenizer
from tasks.results import PartialResults, markdown_table

EXTRA_TOKENS = 8
EDGE_PUNCTUATION = " .,;:!?\"'"
NORMALISATION = ("NFKC, casefold, white space runs -> one space, white space and . , ; : ! ? \" ' stripped from "
                 "both ends")


def normalise_answer(text: str) -> str:
    """The form in which an answer and its target are compared (module doc)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split()).strip(EDGE_PUNCTUATION)


@dataclass
class Example:
    key: str  # "file:line"
    conversation: object  # data/sft_formats.Conversation, the last turn the target


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_examples(specs: List[str], sft_format: str = "auto") -> Tuple[List[Example], List[str]]:
    """(examples, problems): every record of the files (a file, folder or glob
    each, as preprocessing reads them) with a "file:line: reason" per unusable line."""
    from megatron.training.data.jsonl_reader import InputError, find_input_files
    from megatron.training.data.preference_formats import BadPair, record_to_pair
    from megatron.training.data.sft_formats import SFT_BAD_REASONS, BadRecord, record_to_conversation

    examples, problems = [], []
    for spec in specs:
        try:
            files = find_input_files(spec)
        except InputError as e:
            raise EvalError(str(e).replace("--input", "--data"))
        for path in files:
            with _open(path) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not a JSON object")
                        if "chosen" in record and "rejected" in record:
                            conversation = record_to_pair(record).chosen
                        else:
                            conversation = record_to_conversation(record, sft_format)
                    except BadPair as e:
                        problems.append(f"{where}: {e.describe()}")
                        continue
                    except BadRecord as e:
                        problems.append(f"{where}: {SFT_BAD_REASONS[e.reason]}")
                        continue
                    except (ValueError, UnicodeDecodeError) as e:
                        problems.append(f"{where}: not a JSON object ({e})")
                        continue
                    examples.append(Example(where, conversation))
    if not examples:
        raise EvalError(f"--data {' '.join(specs)} holds no usable record"
                        + (f" ({problems[0]})" if problems else ""))
    return examples, problems


def _response_ids(encoder, conversation) -> List[int]:
    """The ids training learnt for the last response: the target, end-of-turn tokens included."""
    ids, mask = encoder.encode(conversation)
    start = len(ids)
    while start and mask[start - 1]:
        start -= 1
    return ids[start:]


def answer_records(lm: LanguageModel, encoder, examples: List[Example], max_new_tokens, max_length: int) -> list:
    """Generate the answers to `examples` (one batch) and compare each with its target."""
    tok = encoder.tokenizer
    specials = set(getattr(tok, "special_ids", ())) | {tok.eod}
    prompts, budgets, stops = [], [], []
    for example in examples:
        response = _response_ids(encoder, example.conversation)
        prompts.append(encoder.encode_prompt(example.conversation))
        budgets.append(max_new_tokens or len(response) + EXTRA_TOKENS)
        stops.append({tok.eod} | (specials & set(response)))
    records = []
    for example, new, stop in zip(examples, greedy_batch(lm, prompts, budgets, stops, max_length), stops):
        stopped = bool(new) and new[-1] in stop
        answer = tok.detokenize([t for t in (new[:-1] if stopped else new) if t not in specials])
        target = example.conversation.turns[-1][1]
        a, t = normalise_answer(answer), normalise_answer(target)
        records.append({"key": example.key, "answer": answer, "target": target, "stopped": stopped,
                        "exact": a == t, "contains": t in a})
    return records


def evaluate(lm: LanguageModel, encoder, examples: List[Example], results: PartialResults, max_new_tokens,
             max_length: int, batch_size: int) -> None:
    """Answer every example not yet in `results`, `batch_size` prompts at a time."""
    todo = [e for e in examples if e.key not in results]
    done = 0
    for batch in chunks(todo, batch_size):
        results.add(answer_records(lm, encoder, batch, max_new_tokens, max_length))
        before, done = done, done + len(batch)
        if lm.is_writer and (done // 200 > before // 200 or done == len(todo)):
            print(f"answers: generated {done}/{len(todo)}", file=sys.stderr, flush=True)


def summary(examples: List[Example], results: PartialResults) -> dict:
    records = [results.records[e.key] for e in examples]
    n = len(records)
    exact, contains = sum(r["exact"] for r in records), sum(r["contains"] for r in records)
    per_target = {}
    for r in records:
        row = per_target.setdefault(normalise_answer(r["target"]), {"examples": 0, "exact": 0})
        row["examples"] += 1
        row["exact"] += r["exact"]
    return {"examples": n, "exact_match": exact / n, "exact_count": exact, "contains": contains / n,
            "contains_count": contains, "stopped": sum(r["stopped"] for r in records),
            "targets": per_target if len(per_target) <= 20 else None}


def report_markdown(result: dict) -> str:
    rows = [["all", result["examples"], f"{100 * result['exact_match']:.2f}", f"{100 * result['contains']:.2f}"]]
    for target, row in (result["targets"] or {}).items():
        rows.append([target, row["examples"], f"{100 * row['exact'] / row['examples']:.2f}", ""])
    header = ["target", "examples", "exact match (%)", "contains (%)"]
    return (f"{result['settings']['model']}: greedy answers to {', '.join(result['settings']['data'])} "
            f"(normalisation: {NORMALISATION})\n\n" + markdown_table(header, rows, align="lrrr"))


def run(args, lm: LanguageModel) -> dict:
    """The answers task of tasks/main.py."""
    from megatron.training.checkpoint.iterations import iteration_to_load
    from megatron.training.data.sft_templates import SFTEncoder

    tokenizer = data_tokenizer(args)
    if tokenizer is None:
        raise EvalError("--task answers needs a tokenizer and the checkpoint records none: pass --tokenizer-type "
                        "and --tokenizer-model")
    encoder = SFTEncoder(tokenizer, args.chat_template)
    examples, problems = read_examples(args.data, args.sft_format)
    chosen = iteration_to_load(args.load) if args.load else None
    settings = {"task": "answers", "model": args.load or args.hf_model, "iteration": chosen and chosen[1],
                "data": list(args.data), "sft_format": args.sft_format, "chat_template": args.chat_template,
                "template": encoder.description, "normalisation": NORMALISATION,
                "max_new_tokens": args.max_new_tokens or f"target + {EXTRA_TOKENS}", "max_length": args.max_length}
    results = PartialResults(args.results_file, settings, lm.is_writer)
    evaluate(lm, encoder, examples, results, args.max_new_tokens, args.max_length, args.micro_batch_size)
    return dict(summary(examples, results), settings=settings, malformed_rows=problems)
