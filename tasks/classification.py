"""Classification in FinGPT's instruction format, scored by label likelihood.

Data: jsonl, one {"instruction", "input", "output"} per line (FinGPT's
fingpt-sentiment-train, FPB, FiQA-SA, TFNS, NWGI, headline datasets). The
labels are --labels, or the distinct outputs of the file (lower-cased).
For every example each label is scored as the continuation of the prompt
(tasks/templates/fingpt.json); the most likely label is the prediction
(`--label-scoring mean` divides by the label's token count). Reported:
accuracy, macro-F1 (the mean of per-label F1 over the labels that occur as
gold or prediction) and per-label precision / recall / F1.
"""

import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from tasks.chat import chat_prompts, prompt_renderer
from tasks.lm import EvalError, LanguageModel, chunks, require_tokenizer
from tasks import multiple_choice
from tasks.results import PartialResults, markdown_table
from tasks.scoring import encode_pairs, precision_recall_f1, score_continuations

TEMPLATE_FIELDS = {"prompt": {"instruction", "input"}, "answer": {"label"}}


@dataclasses.dataclass
class Example:
    index: int
    instruction: str
    input: str
    label: str
    source: str


def normalise_label(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def jsonl_records(path: str):
    """(source "file:line", record or None, problem or None) per non-empty line of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line), None
            except ValueError as e:
                yield f"{path}:{number}", None, f"not JSON ({e.msg})"


def read_fingpt_jsonl(path: str, labels: Optional[List[str]] = None) -> Tuple[List[Example], List[str], List[str]]:
    """(examples, labels, problems): a `file:line: problem` per unusable line."""
    examples, problems = [], []
    for source, record, problem in jsonl_records(path):
        if problem:
            problems.append(f"{source}: {problem}")
            continue
        fields = ("instruction", "input", "output")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
            problems.append(f"{source}: needs string fields instruction, input, output")
            continue
        label = normalise_label(record["output"])
        if labels and label not in labels:
            problems.append(f"{source}: output {record['output']!r} is not one of --labels {','.join(labels)}")
            continue
        examples.append(Example(len(examples), record["instruction"], record["input"], label, source))
    if not examples:
        raise EvalError(f"{path}: no usable examples" + (f" ({len(problems)} malformed lines)" if problems else ""))
    return examples, labels or sorted({e.label for e in examples}), problems


def load_template(path: str) -> Dict[str, str]:
    return multiple_choice.load_template(path, TEMPLATE_FIELDS)


def load_fingpt_files(args, labels: Optional[List[str]] = None,
                      min_labels: int = 0) -> Tuple[Dict[str, Tuple[List[Example], List[str]]], List[str]]:
    """{task (file name without .jsonl): (examples, labels)} for every --data
    file, and the malformed lines (an error with --strict, warnings otherwise)."""
    loaded, problems = {}, []
    for path in args.data:
        examples, task_labels, bad = read_fingpt_jsonl(path, labels)
        if len(task_labels) < min_labels:
            raise EvalError(f"{path}: only the label {task_labels} occurs: give the label set with --labels a,b,c")
        loaded[os.path.splitext(os.path.basename(path))[0]] = (examples, task_labels)
        problems += bad
    if problems and args.strict:
        raise EvalError("malformed lines (--strict):\n" + "\n".join(problems))
    for p in problems:
        print(f"warning: skipped malformed line {p}", file=sys.stderr)
    return loaded, problems


def evaluate(lm: LanguageModel, task: str, examples: List[Example], labels: List[str], template: Dict[str, str],
             results: PartialResults, batch_size: int = 4, max_length: int = 0, per_step: int = 8,
             render=None) -> None:
    """`render(prompt) -> (context text, prefix ids)`: tasks/chat.py's (default: the plain prompt)."""
    require_tokenizer(lm, "classification")
    render = render or prompt_renderer(lm.tokenizer)
    todo = [e for e in examples if f"{task}/{e.index}" not in results]
    for step in chunks(todo, per_step):
        requests = []
        for e in step:
            context, prefix = render(template["prompt"].format(instruction=e.instruction, input=e.input))
            answers = [template["answer"].format(label=label) for label in labels]
            requests += encode_pairs(lm.tokenizer, context, answers, prefix)
        scores = score_continuations(lm, requests, batch_size, max_length)
        n = len(labels)
        results.add({"key": f"{task}/{e.index}", "label": e.label,
                     "logprobs": [s.logprob for s in scores[n * i: n * i + n]],
                     "tokens": [s.tokens for s in scores[n * i: n * i + n]]} for i, e in enumerate(step))


def metrics(gold: List[str], predicted: List[str]) -> dict:
    """accuracy, macro_f1 and per-label precision / recall / f1 / support."""
    per_label = {}
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        per_label[label] = precision_recall_f1(tp, predicted.count(label), gold.count(label))
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    macro_f1 = sum(v["f1"] for v in per_label.values()) / len(per_label)
    return {"examples": len(gold), "accuracy": accuracy, "macro_f1": macro_f1, "labels": per_label}


def task_report(task: str, examples: List[Example], labels: List[str], results: PartialResults, mean: bool) -> dict:
    gold, predicted = [], []
    for e in examples:
        r = results.records[f"{task}/{e.index}"]
        values = [lp / t for lp, t in zip(r["logprobs"], r["tokens"])] if mean else r["logprobs"]
        gold.append(e.label)
        predicted.append(labels[max(range(len(labels)), key=lambda i: values[i])])
    return metrics(gold, predicted)


def report_markdown(result: dict) -> str:
    rows = [[task, m["examples"], f"{100 * m['accuracy']:.2f}", f"{100 * m['macro_f1']:.2f}"]
            for task, m in result["tasks"].items()]
    return f"{result['settings']['model']}\n\n" + markdown_table(["task", "examples", "accuracy (%)", "macro-F1 (%)"], rows)


def run(args, lm: LanguageModel) -> dict:
    """The fingpt task of tasks/main.py: one row per --data file."""
    labels = [normalise_label(x) for x in args.labels.split(",")] if args.labels else None
    template = load_template(args.template)
    loaded, problems = load_fingpt_files(args, labels, min_labels=2)
    render, chat = chat_prompts(args, lm.tokenizer)
    settings = {"task": "fingpt", "model": args.load or args.hf_model, "template": template,
                "labels": {t: v[1] for t, v in loaded.items()}, "label_scoring": args.label_scoring,
                "interpolation_factor": lm.interpolation_factor, "max_length": args.max_length, **chat}
    results = PartialResults(args.results_file, settings, lm.is_writer)
    out = {"settings": settings, "tasks": {}, "malformed_rows": problems}
    for task, (examples, task_labels) in loaded.items():
        evaluate(lm, task, examples, task_labels, template, results, args.micro_batch_size, args.max_length,
                 render=render)
        out["tasks"][task] = task_report(task, examples, task_labels, results, args.label_scoring == "mean")
    return out
