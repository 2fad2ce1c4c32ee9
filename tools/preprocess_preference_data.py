"""Turn preference jsonl (TRL {prompt, chosen, rejected}, LLaMA-Factory
{instruction, input, chosen, rejected}, or chat message lists) into
{prefix}_pair_text_document and {prefix}_pair_loss_mask_document indexed
datasets, one document of two sequences (chosen, rejected) per pair.

    python tools/preprocess_preference_data.py --input prefs.jsonl --output-prefix dpo/train \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model Llama-2-7b-chat-hf --seq-length 2048 --workers 8

Record formats: megatron/training/data/preference_formats.py; templates and
masks: the SFT ones (sft_templates.py). The first bad record stops the run
with its file:line, and nothing is written; an over-long pair is one, unless
--truncation-mode cuts it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    from megatron.training.data.sft_templates import CHAT_TEMPLATE_CHOICES
    from megatron.training.tokenizer import TOKENIZERS, add_tokenizer_file_flags

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a .jsonl / .jsonl.gz file, a folder of them, or a quoted glob")
    p.add_argument("--output-prefix", required=True, help="path prefix of the outputs, without suffix")
    p.add_argument("--seq-length", type=int, required=True,
                   help="the training --seq-length: a pair whose chosen or rejected side has more than "
                        "seq_length + 1 tokens is refused with its line (unless --truncation-mode)")
    p.add_argument("--truncation-mode", choices=["keep_start", "keep_end"], default=None,
                   help="cut a side longer than seq_length + 1 tokens to its first (keep_start) or last (keep_end) "
                        "tokens, as TRL's DPO collator does with max_length = seq_length + 1; pairs left with no "
                        "response token are dropped and counted. Default: refuse such pairs")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default="auto",
                   help="auto: the tokenizer's own chat template when it has one, else raw (TRL strings), "
                        "alpaca (LLaMA-Factory records), chatml (message lists)")
    p.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZERS))
    add_tokenizer_file_flags(p)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (one per core is right)")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from megatron.training.data.preference_preprocess import (
        PreferencePreprocessConfig, preference_report_text, preprocess_preference,
    )
    from megatron.training.data.preprocess import run_data_tool

    run_data_tool(args, PreferencePreprocessConfig, preprocess_preference, preference_report_text)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
