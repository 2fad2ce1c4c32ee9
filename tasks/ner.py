"""Named-entity recognition in FinGPT's instruction format (fingpt-ner),
scored the way FinGPT's own benchmark scores it.

Data: jsonl, one {"instruction", "input", "output"} per line, the output
written as comma-separated clauses "<entity> is a/an <type>", e.g.
"apple inc is an organization, tim cook is a person."

For every example the model continues the prompt (tasks/templates/fingpt.json)
greedily until its end-of-document token or --max-new-tokens. The gold
output and the generated one are read the same way: lower-cased, split at
commas, each clause matched against "<entity> is a/an <type>"; the entity's
words are looked up in the lower-cased, whitespace-split input, where the
first occurrence not taken by an earlier entity becomes the span. Entities
whose type is not one of --entity-types, or whose words are not in the input,
give no span. Scored at the entity level (a prediction counts only with the
exact span and type): precision, recall and F1 per type and micro-averaged
over all types — what seqeval's report gives on the B-/I- tags FinGPT builds
from the same spans.
"""

import re
import sys
from typing import Dict, List, Sequence, Set, Tuple

from tasks.classification import Example, load_fingpt_files, load_template
from tasks.generation import generate
from tasks.chat import chat_prompts, prompt_renderer
from tasks.lm import LanguageModel, encode, require_tokenizer
from tasks.results import PartialResults, markdown_table
from tasks.scoring import precision_recall_f1

ENTITY_TYPES = ("person", "organization", "location")  # FinGPT's PER / ORG / LOC
_CLAUSE = re.compile(r"^(.*) is an? (.*)$")

Span = Tuple[str, int, int]  # (type, first word, one past the last word)


def parse_answer(answer: str) -> List[Tuple[List[str], str]]:
    """[(entity words, type)] of an answer, in order."""
    out = []
    for clause in answer.lower().strip().strip(".").split(","):
        match = _CLAUSE.match(clause.strip())
        if match:
            out.append((match.group(1).split(), match.group(2).strip().strip(".")))
    return out


def entity_spans(text: str, answer: str, types: Sequence[str] = ENTITY_TYPES) -> Set[Span]:
    """The spans an answer names in `text` (see the module docstring)."""
    words = text.lower().split()
    taken = [False] * len(words)
    spans = set()
    for entity, kind in parse_answer(answer):
        n = len(entity)
        if kind not in types or n == 0:
            continue
        for i in range(len(words) - n + 1):
            if words[i:i + n] == entity and not any(taken[i:i + n]):
                taken[i:i + n] = [True] * n
                spans.add((kind, i, i + n))
                break
    return spans


def entity_metrics(gold: List[Set[Span]], predicted: List[Set[Span]], types: Sequence[str] = ENTITY_TYPES) -> dict:
    """Entity-level precision / recall / F1 per type and micro-averaged."""
    per_type = {}
    for kind in types:
        g = [{s for s in spans if s[0] == kind} for spans in gold]
        p = [{s for s in spans if s[0] == kind} for spans in predicted]
        per_type[kind] = precision_recall_f1(sum(len(a & b) for a, b in zip(g, p)), sum(map(len, p)), sum(map(len, g)))
    micro = precision_recall_f1(sum(len(a & b) for a, b in zip(gold, predicted)), sum(map(len, predicted)), sum(map(len, gold)))
    return dict(micro, examples=len(gold), types=per_type)


def evaluate(lm: LanguageModel, task: str, examples: List[Example], template: Dict[str, str],
             results: PartialResults, max_new_tokens: int = 64, max_length: int = 0, render=None) -> None:
    """Generate the answer of every example not yet in `results`, one record each. `render(prompt) ->
    (context text, prefix ids)`: tasks/chat.py's (default: the plain prompt)."""
    require_tokenizer(lm, "ner")
    tok = lm.tokenizer
    render = render or prompt_renderer(tok)
    todo = [e for e in examples if f"{task}/{e.index}" not in results]
    for n, e in enumerate(todo, start=1):
        context, prefix = render(template["prompt"].format(instruction=e.instruction, input=e.input))
        new = generate(lm, prefix + encode(tok, context), max_new_tokens, stop_ids=[tok.eod],
                       max_length=max_length)
        if new and new[-1] == tok.eod:
            new = new[:-1]
        results.add([{"key": f"{task}/{e.index}", "generated": tok.detokenize(new)}])
        if lm.is_writer and (n % 50 == 0 or n == len(todo)):
            print(f"{task}: generated {n}/{len(todo)}", file=sys.stderr, flush=True)


def task_report(task: str, examples: List[Example], results: PartialResults, types: Sequence[str]) -> dict:
    # e.label: the gold output, lower-cased and stripped, which parse_answer does anyway
    gold = [entity_spans(e.input, e.label, types) for e in examples]
    predicted = [entity_spans(e.input, results.records[f"{task}/{e.index}"]["generated"], types) for e in examples]
    return entity_metrics(gold, predicted, types)


def report_markdown(result: dict) -> str:
    rows = []
    for task, m in result["tasks"].items():
        rows.append([task, "micro", m["examples"], m["support"], *(f"{100 * m[k]:.2f}" for k in ("precision", "recall", "f1"))])
        rows += [[task, kind, "", v["support"], *(f"{100 * v[k]:.2f}" for k in ("precision", "recall", "f1"))]
                 for kind, v in m["types"].items()]
    header = ["task", "entity type", "examples", "gold entities", "precision (%)", "recall (%)", "F1 (%)"]
    return f"{result['settings']['model']}\n\n" + markdown_table(header, rows, align="llrrrrr")


def run(args, lm: LanguageModel) -> dict:
    """The ner task of tasks/main.py: one block of rows per --data file."""
    types = tuple(t.strip().lower() for t in args.entity_types.split(",") if t.strip())
    template = load_template(args.template)
    loaded, problems = load_fingpt_files(args)
    render, chat = chat_prompts(args, lm.tokenizer)
    settings = {"task": "ner", "model": args.load or args.hf_model, "template": template, "entity_types": list(types),
                "max_new_tokens": args.max_new_tokens, "interpolation_factor": lm.interpolation_factor,
                "max_length": args.max_length, **chat}
    results = PartialResults(args.results_file, settings, lm.is_writer)
    out = {"settings": settings, "tasks": {}, "malformed_rows": problems}
    for task, (examples, _) in loaded.items():
        evaluate(lm, task, examples, template, results, args.max_new_tokens, args.max_length, render=render)
        out["tasks"][task] = task_report(task, examples, results, types)
    return out
