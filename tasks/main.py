"""Evaluate a Megatron checkpoint (any TP/PP) or a Hugging Face model.

    # perplexity at two lengths, non-overlapping windows, one table
    python tasks/main.py --task perplexity --load ckpt --data-path data/pg19_text_document --seq-length 4096 32768
    # the PI paper's sliding window, with a PI factor chosen at evaluation time
    torchrun --nproc_per_node 2 tasks/main.py --task perplexity --load ckpt --tensor-model-parallel-size 2 \\
        --data-path data/pile_text_document --seq-length 32768 --stride 256 --rotary-seq-len-interpolation-factor 8
    # FinEval, 5-shot, scoring option letters; results.json + results.md; rerun the same command to resume
    python tasks/main.py --task fineval --hf-model llama-hf --data-dir FinEval/data --split val --shots 5 \\
        --output results/fineval
    # FinGPT sentiment, label likelihood
    python tasks/main.py --task fingpt --load ckpt --data fpb.jsonl fiqa.jsonl tfns.jsonl nwgi.jsonl --output results/fingpt
    # the same for an instruct model: each prompt as a user turn of its chat template (tasks/chat.py)
    python tasks/main.py --task fingpt --hf-model Llama-3.1-8B-Instruct --data fpb.jsonl --apply-chat-template \
        --output results/fingpt_instruct
    # FinGPT NER: greedy generation, entity-level precision / recall / F1
    python tasks/main.py --task ner --load ckpt --data fingpt_ner_test.jsonl --output results/ner
    # task accuracy of greedy answers on fine-tuning records (FinLoRA's {context, target}, ...): exact match
    python tasks/main.py --task answers --load ckpt --data valid.jsonl --output results/accuracy

--output PREFIX writes PREFIX.json and PREFIX.md and keeps PREFIX.partial.jsonl
(--results-file), from which an interrupted run resumes: rerun the same command.
(fineval, fingpt and ner need one of the two; perplexity without either prints only.)
"""

import os
import sys

# The repo root first: `megatron.training` and `tasks` are this repo's, while
# `megatron.core` resolves to the pinned pip package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, run_main  # noqa: E402

TASKS = ("perplexity", "fineval", "fingpt", "ner", "answers")


def build_parser() -> Parser:
    from megatron.training.data.sft_formats import SFT_FORMATS
    from megatron.training.data.sft_templates import CHAT_TEMPLATE_CHOICES
    from tasks.chat import add_chat_args
    from tasks.lm import add_model_args

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--output", help="write OUTPUT.json and OUTPUT.md (default: print only)")
    p.add_argument("--max-length", type=int, default=0,
                   help="fineval/fingpt: longest sequence fed to the model; longer prompts lose their beginning (0: no limit)")
    p.add_argument("--strict", action="store_true", help="stop at malformed benchmark rows instead of skipping them")
    add_model_args(p)
    g = p.add_argument_group("perplexity")
    g.add_argument("--data-path", help="an indexed dataset prefix (tools/preprocess_data.py output, without .bin/.idx)")
    g.add_argument("--jsonl", help="a jsonl file of documents (tokenized here)")
    g.add_argument("--json-key", default="text")
    g.add_argument("--seq-length", type=int, nargs="+", default=[4096], help="one or more window lengths, one row each")
    g.add_argument("--stride", type=int, nargs="+", default=None,
                   help="tokens between window starts (default: --seq-length, non-overlapping); one or one per length")
    g.add_argument("--max-tokens", type=int, default=0, help="evaluate the first N tokens of the data (0: all)")
    g = p.add_argument_group("fineval / fingpt / ner / answers")
    g.add_argument("--data-dir", help="fineval: FinEval's data folder (dev/, val/, test/ of {subject}_{split}.csv)")
    g.add_argument("--split", default="val", help="fineval: the split to score (test answers are not published)")
    g.add_argument("--subjects", help="fineval: comma-separated subjects (default: every file of the split)")
    g.add_argument("--subject-mapping", help="fineval: subject_mapping.json {subject: [English, 中文, category]}")
    g.add_argument("--shots", type=int, default=0, help="fineval: dev examples before each question")
    g.add_argument("--scoring", choices=["letter", "text"], default="letter",
                   help="fineval: log-likelihood of the option letter or of the option text")
    g.add_argument("--template", default=None,
                   help="prompt template JSON (default: tasks/templates/fineval_zh.json or fingpt.json)")
    g.add_argument("--data", nargs="+", help="fingpt, ner: jsonl files of {instruction, input, output}; answers: "
                   "fine-tuning records (a file, folder or glob each)")
    g.add_argument("--labels", help="fingpt: comma-separated labels (default: the outputs found in each file)")
    g.add_argument("--label-scoring", choices=["sum", "mean"], default="sum",
                   help="fingpt: total or per-token log-likelihood of a label")
    g.add_argument("--entity-types", default="person,organization,location",
                   help="ner: entity types scored (FinGPT's PER / ORG / LOC by default)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="ner: longest generated answer (default 64); answers: default the target's tokens + "
                        "8 (tasks/answers.py)")
    add_chat_args(g)
    g = p.add_argument_group("answers (tasks/answers.py)")
    g.add_argument("--sft-format", choices=SFT_FORMATS, default="auto",
                   help="--data's record format, as preprocessing read it")
    g.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default="auto",
                   help="the template preprocessing rendered the prompts with (data/sft_templates.py)")
    p.add_argument("--results-file", help="partial results to resume from (default: OUTPUT.partial.jsonl)")
    return p


def evaluate(argv=None) -> None:
    """Run the task the flags name and print its table (on the writer rank)."""
    _, markdown, writer = run(build_parser().parse_args(argv))
    if writer:
        print(markdown)


def main(argv=None) -> int:
    return run_main(evaluate, argv)


def run(args):
    """(result dict, markdown, whether this rank writes) for the parsed flags; writes --output on the writer rank."""
    from tasks import answers, classification, multiple_choice, ner, perplexity
    from tasks.chat import check_chat_args
    from tasks.lm import EvalError, build_language_model
    from tasks.results import write_json, write_text

    if args.results_file is None and args.output:
        args.results_file = args.output + ".partial.jsonl"
    if args.task != "perplexity":
        if args.template is None:
            args.template = "fineval_zh" if args.task == "fineval" else "fingpt"  # fingpt, ner
        if args.results_file is None:
            if not args.output:
                raise EvalError(f"--task {args.task} needs --output PREFIX (or --results-file FILE) for its "
                                "partial results, from which an interrupted run resumes")
        if args.task == "fineval" and not args.data_dir:
            raise EvalError("--task fineval needs --data-dir (FinEval's data folder)")
        if args.task in ("fingpt", "ner") and not args.data:
            raise EvalError(f"--task {args.task} needs --data FILE.jsonl [FILE.jsonl ...] in FinGPT's instruction "
                            "format ({instruction, input, output} per line)")
        if args.task == "answers" and not args.data:
            raise EvalError("--task answers needs --data FILE.jsonl [...]: records with their targets, in a format "
                            "the SFT tools read ({context, target}, alpaca, chat) or preference pairs")
    check_chat_args(args)
    if args.task == "ner" and args.max_new_tokens is None:
        args.max_new_tokens = 64
    lm = build_language_model(args)
    try:
        if args.task == "perplexity":
            rows = perplexity.run(args, lm)
            result, markdown = {"rows": rows}, perplexity.perplexity_table(rows)
        elif args.task == "fineval":
            result = multiple_choice.run(args, lm)
            markdown = multiple_choice.report_markdown(result)
        elif args.task == "fingpt":
            result = classification.run(args, lm)
            markdown = classification.report_markdown(result)
        elif args.task == "ner":
            result = ner.run(args, lm)
            markdown = ner.report_markdown(result)
        else:
            result = answers.run(args, lm)
            markdown = answers.report_markdown(result)
        if args.output and lm.is_writer:
            write_json(args.output + ".json", result)
            write_text(args.output + ".md", markdown)
    finally:
        lm.close()
    return result, markdown, lm.is_writer


if __name__ == "__main__":
    sys.exit(main())
