"""Fine-tune from a named configuration, as FinLoRA's `python finetune.py <config_name>`.

    python finetune.py sentiment_llama_2_7b                 # entry of ./finetune_configs.json
    python finetune.py my_run --configs configs/sft.json     # another file
    python finetune.py my_run --dry-run                      # preprocess, then print the commands

Steps, each skipped when its output exists: preprocess the jsonl files
(tools/preprocess_sft_data.py), convert an HF base model to a Megatron
checkpoint (tools/checkpoint/util.py), train with finetune_gpt.py (torchrun
with the layout's process count; --finetune from the base, or resume from
{save_dir}/checkpoints), export to HF ({save_dir}/hf). The keys and their
defaults: FIELDS in megatron/training/finetune_config.py.
"""

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)


def run(command, dry_run: bool) -> None:
    print("+ " + shlex.join(command), flush=True)
    if not dry_run:
        subprocess.run(command, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("config_name")
    p.add_argument("--configs", default=os.path.join(REPO, "finetune_configs.json"),
                   help="the JSON file of named configurations (default: finetune_configs.json beside this file)")
    p.add_argument("--dry-run", action="store_true",
                   help="preprocess the data (needed to count steps), print the other commands, run nothing else")
    args = p.parse_args(argv)

    from megatron.training import finetune_config as fc
    from megatron.training.data.jsonl_reader import InputError
    from megatron.training.data.sft_dataset import SFTDataError
    from megatron.training.data.sft_preprocess import preprocess_sft, sft_report_text
    from megatron.training.data.sft_templates import TemplateError
    from megatron.training.tokenizer import TokenizerError

    try:
        plan = fc.make_plan(fc.load_config(args.configs, args.config_name))
        for split in plan.to_preprocess:
            print(f"+ preprocess {plan.to_preprocess[split]} -> {plan.data[split]}", flush=True)
            print(sft_report_text(preprocess_sft(fc.preprocess_config(plan, split))), file=sys.stderr)
        train = fc.samples_per_epoch(plan, "train")
        valid = fc.samples_per_epoch(plan, "valid") if "valid" in plan.data else None
    except (fc.ConfigError, InputError, TokenizerError, TemplateError, SFTDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for command in (fc.convert_command(plan, REPO), fc.train_command(plan, REPO, train, valid),
                    fc.export_command(plan, REPO)):
        if command:
            try:
                run(command, args.dry_run)
            except subprocess.CalledProcessError as e:
                print(f"error: the step above failed (exit code {e.returncode}); fix what it reports and run "
                      "finetune.py again: finished steps are skipped", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
