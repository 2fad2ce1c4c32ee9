"""finetune.py's task accuracy step ("eval_accuracy": true, or finetune.py
--eval-accuracy): after training, the last checkpoint of {save_dir}/checkpoints
answers every record of valid_dataset_path greedily (tasks/main.py --task
answers, on the training layout's TP x PP processes; adapters applied as they
were trained, QLoRA's quantized base included), and the answers are compared
with the targets: exact match after normalisation, and FinLoRA's containment
(tasks/answers.py says which normalisation). Written to
{save_dir}/accuracy.json (the numbers, the settings, the checkpoint iteration)
and accuracy.md, per-record answers in accuracy.partial.jsonl; finetune.py
prints one line of it. A rerun skips the step while accuracy.json is of the
checkpoint's current iteration.

Stage dpo: the records are preference pairs and the target is the chosen
response, so with FinLoRA-style pairs (a label chosen, another rejected) this
is the task accuracy after preference tuning; for open-ended pairs exact
match says little, and the validation's rewards/accuracies (the share of
pairs whose chosen reply the trained policy prefers) is the measure.
"""

import json
import os
import sys
from typing import List, Optional

from megatron.training.fileio import remove_quietly
from megatron.training.finetune_config import ConfigError, Plan, tracker_iteration

OUTPUT = "accuracy"  # {save_dir}/accuracy.json, .md, .partial.jsonl


def enabled(plan: Plan, flag: bool) -> bool:
    return bool(flag or plan.cfg["eval_accuracy"])


def check_accuracy_config(plan: Plan, name: str) -> None:
    """The records the step reads: valid_dataset_path as jsonl (the targets are in the records)."""
    source = plan.cfg["valid_dataset_path"]
    if source is None:
        raise ConfigError(f"{name}: eval_accuracy answers the held-out records of valid_dataset_path: set it to a "
                          "jsonl file (records with their targets), or drop eval_accuracy")
    if plan.data.get("valid") == source:
        raise ConfigError(f"{name}: valid_dataset_path {source} is preprocessed data, which has no target texts to "
                          "compare answers with: give the jsonl it was made from, or drop eval_accuracy")


def _path(plan: Plan, suffix: str) -> str:
    return os.path.join(plan.cfg["save_dir"], OUTPUT + suffix)


def _recorded_iteration(path: str, first_line: bool) -> Optional[object]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.readline() if first_line else f.read())
        return data["settings"]["iteration"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_current(plan: Plan) -> bool:
    """accuracy.json is of the checkpoint finetune.py trained last."""
    iteration = tracker_iteration(plan)
    return iteration is not None and _recorded_iteration(_path(plan, ".json"), False) == iteration


def clear_stale(plan: Plan) -> None:
    """Remove accuracy files of another checkpoint iteration than the current one
    (a partial file of the current one is kept: the step resumes from it)."""
    iteration = tracker_iteration(plan)
    if _recorded_iteration(_path(plan, ".json"), False) != iteration:
        remove_quietly(_path(plan, ".json"))
        remove_quietly(_path(plan, ".md"))
    if _recorded_iteration(_path(plan, ".partial.jsonl"), True) != iteration:
        remove_quietly(_path(plan, ".partial.jsonl"))


def accuracy_command(plan: Plan, repo: str) -> List[str]:
    """tasks/main.py --task answers on the trained checkpoint, at the training layout's TP x PP."""
    cfg, layout = plan.cfg, plan.cfg["layout"]
    tp, pp = int(layout.get("tensor_parallel", 1)), int(layout.get("pipeline_parallel", 1))
    launcher = [sys.executable] if tp * pp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp * pp)]
    return launcher + [
        os.path.join(repo, "tasks", "main.py"), "--task", "answers", "--load", plan.checkpoints,
        "--data", cfg["valid_dataset_path"], "--sft-format", cfg["format"], "--chat-template", cfg["chat_template"],
        "--output", _path(plan, ""), "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
        str(pp), "--micro-batch-size", str(cfg["batch_size"]), *plan.tokenizer, *(["--bf16"] if cfg["bf16"] else [])]


def accuracy_line(plan: Plan) -> Optional[str]:
    """One line of accuracy.json for finetune.py's last lines (None when there is none)."""
    try:
        with open(_path(plan, ".json"), encoding="utf-8") as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return (f"task accuracy on {', '.join(r['settings']['data'])} (iteration "
            f"{r['settings']['iteration']}, greedy answers): exact match {r['exact_match']:.4f} "
            f"({r['exact_count']}/{r['examples']}), contains {r['contains']:.4f} (FinLoRA's comparison): "
            f"{_path(plan, '.json')}")
