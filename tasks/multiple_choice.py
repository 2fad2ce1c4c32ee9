"""Multiple-choice benchmarks in FinEval's published format (C-Eval's layout).

Data: one CSV per subject and split, columns `id, question, A, B, C, D,
answer` and optionally `explanation`, in DATA_DIR/{dev,val,test}/
{subject}_{split}.csv (or all in DATA_DIR). The dev split gives the few-shot
examples: the first k rows of the subject's dev file.

Scoring, no generation: the prompt (tasks/templates/*.json) is followed by
each option's continuation and the option with the highest log-likelihood is
the prediction. `--scoring letter` scores the option letter ("A".."D"),
`--scoring text` the option's text (also reported normalised per character).

    questions, problems = read_fineval_csv(path)          # problems: ["file:line: what is wrong", ...]
    prompt = build_prompt(template, subject_name, shots, question)
    report = evaluate(lm, subjects, template, shots=5, scoring="letter", results=partial)
"""

import csv
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from tasks.chat import chat_prompts, prompt_renderer
from tasks.lm import EvalError, LanguageModel, chunks, require_tokenizer
from tasks.results import PartialResults, markdown_table
from tasks.scoring import encode_pairs, score_continuations

LETTERS = ("A", "B", "C", "D")
REQUIRED_COLUMNS = ("id", "question") + LETTERS + ("answer",)
TEMPLATE_FIELDS = {"description": {"subject"}, "question": {"question", *LETTERS}, "answer": {"answer"},
                   "example_separator": set()}
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@dataclasses.dataclass
class Question:
    id: str
    question: str
    options: Dict[str, str]
    answer: str
    source: str  # file:line, for messages


@dataclasses.dataclass
class Subject:
    name: str          # the file name's subject, e.g. "auditing"
    display: str       # what {subject} renders to
    category: str
    questions: List[Question]
    dev: List[Question]


# ------------------------------------------------------------------ reading

def read_fineval_csv(path: str, require_answer: bool = True) -> Tuple[List[Question], List[str]]:
    """Questions of one CSV file and a `file:line: problem` message for each
    row that cannot be used (those rows are left out)."""
    questions, problems = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise EvalError(f"{path}:1: empty file: expected a header {','.join(REQUIRED_COLUMNS)}[,explanation]")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing and not (not require_answer and missing == ["answer"]):
            raise EvalError(f"{path}:1: header lacks {', '.join(missing)}: FinEval files have columns "
                            f"{','.join(REQUIRED_COLUMNS)}[,explanation]")
        col = {name: i for i, name in enumerate(header)}
        line = reader.line_num + 1
        for row in reader:
            source = f"{path}:{line}"
            line = reader.line_num + 1  # a quoted field may span lines
            if not any(cell.strip() for cell in row):
                continue
            problem = _row_problem(row, header, col, require_answer)
            if problem:
                problems.append(f"{source}: {problem}")
                continue
            answer = row[col["answer"]].strip().upper() if "answer" in col else ""
            questions.append(Question(row[col["id"]].strip(), row[col["question"]],
                                      {k: row[col[k]] for k in LETTERS}, answer, source))
    return questions, problems


def _row_problem(row: List[str], header: List[str], col: Dict[str, int], require_answer: bool) -> Optional[str]:
    if len(row) != len(header):
        return (f"{len(row)} fields, the header has {len(header)} (an unquoted comma or newline inside a field? "
                "quote the field)")
    for name in ("question",) + LETTERS:
        if not row[col[name]].strip():
            return f"empty {name!r}"
    if require_answer:
        answer = row[col["answer"]].strip().upper() if "answer" in col else ""
        if answer not in LETTERS:
            hint = " (the test split's answers are not published: evaluate --split val)" if not answer else ""
            return f"answer {answer!r} is not one of A, B, C, D{hint}"
    return None


def find_subject_files(data_dir: str, split: str) -> Dict[str, Tuple[str, Optional[str]]]:
    """{subject: (eval csv, dev csv or None)} from DATA_DIR/{split}/*_{split}.csv or DATA_DIR/*_{split}.csv."""
    def files(kind):
        found = {}
        for folder in (os.path.join(data_dir, kind), data_dir):
            if os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    if name.endswith(f"_{kind}.csv"):
                        found.setdefault(name[: -len(f"_{kind}.csv")], os.path.join(folder, name))
        return found

    evals, devs = files(split), files("dev")
    if not evals:
        raise EvalError(f"no *_{split}.csv in {data_dir} or {os.path.join(data_dir, split)}: point --data-dir at "
                        "FinEval's data folder (with dev/ and val/) or choose --split")
    return {s: (p, devs.get(s)) for s, p in evals.items()}


def read_subject_mapping(path: Optional[str]) -> Dict[str, Tuple[str, str]]:
    """{subject: (display name, category)} from a C-Eval/FinEval-style
    subject_mapping.json: {"subject": ["English name", "中文名", "Category"], ...}."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = {}
    for subject, value in raw.items():
        value = [value] if isinstance(value, str) else list(value)
        out[subject] = (value[1] if len(value) > 1 else value[0], value[2] if len(value) > 2 else "")
    return out


def load_subjects(data_dir: str, split: str, shots: int, only: Optional[List[str]] = None,
                  mapping_file: Optional[str] = None, strict: bool = False) -> Tuple[List[Subject], List[str]]:
    """The subjects to evaluate, and the problems found in their files."""
    files = find_subject_files(data_dir, split)
    if only:
        unknown = sorted(set(only) - set(files))
        if unknown:
            raise EvalError(f"--subjects {', '.join(unknown)}: no such file; available: {', '.join(files)}")
        files = {s: files[s] for s in only}
    mapping = read_subject_mapping(mapping_file)
    subjects, problems = [], []
    for name, (path, dev_path) in files.items():
        questions, bad = read_fineval_csv(path, require_answer=True)
        problems += bad
        dev = []
        if shots:
            if dev_path is None:
                raise EvalError(f"{shots}-shot needs {name}_dev.csv next to {path} (or in dev/): add it or use --shots 0")
            dev, bad_dev = read_fineval_csv(dev_path)
            problems += bad_dev
            if len(dev) < shots:
                raise EvalError(f"{dev_path} has {len(dev)} usable examples, fewer than --shots {shots}: "
                                f"use --shots {len(dev)} or fewer")
        display, category = mapping.get(name, (name.replace("_", " "), ""))
        subjects.append(Subject(name, display, category, questions, dev[:shots]))
    if problems and strict:
        raise EvalError("malformed rows (--strict):\n" + "\n".join(problems))
    return subjects, problems


# ------------------------------------------------------------------ prompts

def load_template(path: str, fields: Optional[Dict[str, set]] = None) -> Dict[str, str]:
    """A prompt template from a file or a built-in name: JSON whose strings are
    `fields` (default FinEval's description / question / answer / example_separator)."""
    if not os.path.isfile(path):
        builtin = os.path.join(TEMPLATE_DIR, path if path.endswith(".json") else path + ".json")
        if not os.path.isfile(builtin):
            raise EvalError(f"--template {path}: no such file (built in: {', '.join(sorted(os.listdir(TEMPLATE_DIR)))})")
        path = builtin
    with open(path, encoding="utf-8") as f:
        template = json.load(f)
    return check_template(template, fields or TEMPLATE_FIELDS, path)


def check_template(template: dict, fields: Dict[str, set], path: str) -> Dict[str, str]:
    import string

    out = {}
    for key, allowed in fields.items():
        text = template.get(key, "\n\n" if key == "example_separator" else None)
        if not isinstance(text, str):
            raise EvalError(f"{path}: needs a string {key!r}")
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        if used - allowed:
            raise EvalError(f"{path}: {key!r} uses {{{', '.join(sorted(used - allowed))}}}; "
                            f"it may use {', '.join('{' + a + '}' for a in sorted(allowed)) or 'no placeholders'} "
                            "(write {{ and }} for literal braces)")
        out[key] = text
    return out


def option_text(template: Dict[str, str], question: Question, letter: str, scoring: str) -> str:
    return template["answer"].format(answer=letter if scoring == "letter" else question.options[letter])


def build_prompt(template: Dict[str, str], subject: str, shots: List[Question], question: Question,
                 scoring: str = "letter") -> str:
    """description + each shot answered + the question, unanswered."""
    parts = [template["description"].format(subject=subject)]
    for shot in shots:
        parts.append(template["question"].format(question=shot.question, **shot.options)
                     + option_text(template, shot, shot.answer, scoring) + template["example_separator"])
    parts.append(template["question"].format(question=question.question, **question.options))
    return "".join(parts)


# ------------------------------------------------------------------ evaluation

def evaluate(lm: LanguageModel, subjects: List[Subject], template: Dict[str, str], scoring: str,
             results: PartialResults, batch_size: int = 4, max_length: int = 0, questions_per_step: int = 8,
             render=None) -> None:
    """Score every question not yet in `results`, adding a record per question. `render(prompt) ->
    (context text, prefix ids)`: tasks/chat.py's (default: the plain prompt)."""
    require_tokenizer(lm, "multiple choice")
    render = render or prompt_renderer(lm.tokenizer)
    for subject in subjects:
        todo = [q for q in subject.questions if f"{subject.name}/{q.id}" not in results]
        for step in chunks(todo, questions_per_step):
            requests = []
            for q in step:
                context, prefix = render(build_prompt(template, subject.display, subject.dev, q, scoring))
                options = [option_text(template, q, letter, scoring) for letter in LETTERS]
                requests += encode_pairs(lm.tokenizer, context, options, prefix)
            scores = score_continuations(lm, requests, batch_size, max_length)
            records = []
            for i, q in enumerate(step):
                own = scores[4 * i: 4 * i + 4]
                chars = [max(1, len(option_text(template, q, letter, scoring).strip())) for letter in LETTERS]
                records.append({
                    "key": f"{subject.name}/{q.id}", "subject": subject.name, "id": q.id, "answer": q.answer,
                    "logprobs": [s.logprob for s in own], "tokens": [s.tokens for s in own], "chars": chars,
                    "truncated": any(s.truncated for s in own)})
            results.add(records)


def _pick(values: List[float]) -> str:
    return LETTERS[max(range(len(values)), key=lambda i: values[i])]


def report(subjects: List[Subject], results: PartialResults, problems: List[str], settings: dict) -> dict:
    """Accuracy per subject, per category (mean of its subjects) and averaged over subjects."""
    per_subject = {}
    for subject in subjects:
        records = [results.records[f"{subject.name}/{q.id}"] for q in subject.questions]
        n = len(records)
        correct = sum(_pick(r["logprobs"]) == r["answer"] for r in records)
        correct_norm = sum(_pick([lp / c for lp, c in zip(r["logprobs"], r["chars"])]) == r["answer"]
                           for r in records)
        per_subject[subject.name] = {
            "category": subject.category, "questions": n, "accuracy": correct / n if n else 0.0,
            "accuracy_char_norm": correct_norm / n if n else 0.0,
            "truncated": sum(r["truncated"] for r in records)}
    categories: Dict[str, List[float]] = {}
    for s in per_subject.values():
        if s["category"]:
            categories.setdefault(s["category"], []).append(s["accuracy"])
    accuracies = [s["accuracy"] for s in per_subject.values()]
    total = sum(s["questions"] for s in per_subject.values())
    return {
        "settings": settings, "subjects": per_subject,
        "categories": {c: sum(v) / len(v) for c, v in sorted(categories.items())},
        "average": sum(accuracies) / len(accuracies) if accuracies else 0.0,
        "question_weighted_average": (sum(s["accuracy"] * s["questions"] for s in per_subject.values()) / total
                                      if total else 0.0),
        "questions": total, "malformed_rows": problems,
    }


def report_markdown(result: dict) -> str:
    rows = [[name, s["category"], s["questions"], f"{100 * s['accuracy']:.2f}"] for name, s in result["subjects"].items()]
    rows += [[f"**{c}** (category mean)", c, "", f"{100 * a:.2f}"] for c, a in result["categories"].items()]
    rows.append(["**Average** (mean of subjects)", "", result["questions"], f"{100 * result['average']:.2f}"])
    s = result["settings"]
    title = f"{s['shots']}-shot, scoring by option {s['scoring']}, {s['model']}\n\n"
    return title + markdown_table(["subject", "category", "questions", "accuracy (%)"], rows)


def run(args, lm: LanguageModel) -> dict:
    """The fineval task of tasks/main.py."""
    subjects, problems = load_subjects(args.data_dir, args.split, args.shots,
                                       args.subjects.split(",") if args.subjects else None,
                                       args.subject_mapping, args.strict)
    for p in problems:
        print(f"warning: skipped malformed row {p}", file=sys.stderr)
    template = load_template(args.template)
    render, chat = chat_prompts(args, lm.tokenizer)
    settings = {"task": "fineval", "model": args.load or args.hf_model, "split": args.split, "shots": args.shots,
                "scoring": args.scoring, "template": template,
                "interpolation_factor": lm.interpolation_factor, "max_length": args.max_length, **chat}
    results = PartialResults(args.results_file, settings, lm.is_writer)
    evaluate(lm, subjects, template, args.scoring, results, args.micro_batch_size, args.max_length, render=render)
    return report(subjects, results, problems, settings)
