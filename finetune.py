"""Fine-tune from a named configuration, as FinLoRA's `python finetune.py <config_name>`.

    python finetune.py sentiment_llama_2_7b                 # entry of ./finetune_configs.json
    python finetune.py my_run --configs configs/sft.json     # another file
    python finetune.py my_run --dry-run                      # preprocess, then print the commands

Steps, each skipped when its output exists: preprocess the jsonl files
(tools/preprocess_sft_data.py; with "stage": "dpo" the preference pairs,
tools/preprocess_preference_data.py), convert an HF base model to a Megatron
checkpoint (tools/checkpoint/util.py), train with finetune_gpt.py (stage
dpo: finetune_dpo.py, with LLaMA-Factory's pref_loss, pref_beta, pref_ftx;
torchrun with the layout's process count; --finetune from the base, or
resume from {save_dir}/checkpoints), export to HF ({save_dir}/hf). With FinLoRA's
adapter keys (lora_r, quant_bits, peft_use_dora, peft_use_rslora, ...) only
adapters are trained and the export writes the peft directory
{save_dir}/adapter, and {save_dir}/hf merged. Exports of an HF base keep its
config.json, generation_config.json and tokenizer files
(checkpoint_convert/hf_metadata.py). With "eval_accuracy": true (or
--eval-accuracy) the trained checkpoint then answers valid_dataset_path's
records greedily and {save_dir}/accuracy.json holds the exact-match accuracy
(megatron/training/finetune_accuracy.py). Before any step the configuration
is checked against the base model's config.json or checkpoint by the
driver's own checks (layout, batch, adapters, extra_args:
megatron/training/finetune_checks.py), in seconds, writing nothing. The keys
and their defaults: FIELDS in megatron/training/finetune_config.py.
"""

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

from megatron.training.errors import USER_ERROR_EXIT_CODE, Parser, UserError, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("config_name")
    p.add_argument("--configs", default=os.path.join(REPO, "finetune_configs.json"),
                   help="the JSON file of named configurations (default: finetune_configs.json beside this file)")
    p.add_argument("--dry-run", action="store_true",
                   help="preprocess the data (needed to count steps), print the other commands, run nothing else")
    p.add_argument("--eval-accuracy", action="store_true",
                   help="as \"eval_accuracy\": true: after training (or now, for a finished configuration), "
                        "answer valid_dataset_path's records greedily and report exact-match accuracy "
                        "({save_dir}/accuracy.json)")
    return p


class StepFailed(UserError):
    """A step's command failed without a one-line error of its own."""


def run_steps(steps, dry_run: bool) -> int:
    """Run each (command, then) in turn: print the command, run it, then call
    `then()` (unless dry_run). 0, or the exit status 2 of a step that printed
    its own one-line error (one line is enough); other failures raise StepFailed."""
    for command, then in steps:
        print("+ " + shlex.join(command), flush=True)
        if dry_run:
            continue
        code = subprocess.run(command).returncode
        if code == USER_ERROR_EXIT_CODE:
            return code
        if code != 0:
            raise StepFailed(f"the step above failed (exit code {code}); fix what it reports and run finetune.py "
                             "again: finished steps are skipped")
        if then is not None:
            then()
    return 0


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.training import finetune_accuracy as acc
    from megatron.training import finetune_config as fc
    from megatron.training.finetune_checks import check_before_work

    plan = fc.make_plan(fc.load_config(args.configs, args.config_name))
    evaluate = acc.enabled(plan, args.eval_accuracy)
    if evaluate:
        acc.check_accuracy_config(plan, args.config_name)
    check_before_work(plan, REPO, args.config_name)  # nothing is written before this passes
    finished = fc.finished_iteration(plan)
    if finished is not None:
        print(f"{args.config_name} is already done: {plan.checkpoints} holds iteration {finished}, the end of its "
              "training (change the configuration to train on, or remove the checkpoints to start again)",
              flush=True)
        steps = [(command, None) for command in fc.export_commands(plan, REPO)]
        if evaluate and not acc.is_current(plan):
            acc.clear_stale(plan)
            steps.append((acc.accuracy_command(plan, REPO), None))
    else:
        for split in plan.to_preprocess:
            print(f"+ preprocess {plan.to_preprocess[split]} -> {plan.data[split]}", flush=True)
            print(fc.preprocess(plan, split), file=sys.stderr)
        train = fc.samples_per_epoch(plan, "train")
        valid = fc.samples_per_epoch(plan, "valid") if "valid" in plan.data else None

        def trained():
            fc.record_if_finished(plan, train)
            if evaluate:
                acc.clear_stale(plan)  # answers of an earlier checkpoint

        steps = [(fc.convert_command(plan, REPO), None), (fc.train_command(plan, REPO, train, valid), trained),
                 *[(command, None) for command in fc.export_commands(plan, REPO)],
                 *([(acc.accuracy_command(plan, REPO), None)] if evaluate else [])]
    code = run_steps([(command, then) for command, then in steps if command], args.dry_run)
    if code == 0 and not args.dry_run:
        print(fc.outputs_summary(plan), flush=True)
        if evaluate and acc.accuracy_line(plan):
            print(acc.accuracy_line(plan), flush=True)
    return code


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
