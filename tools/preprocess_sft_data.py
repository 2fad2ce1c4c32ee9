"""Turn SFT jsonl (PandaLLM, Alpaca/LLaMA-Factory or chat records) into
{prefix}_text_document and {prefix}_loss_mask_document indexed datasets.

    python tools/preprocess_sft_data.py --input data/train.jsonl --output-prefix sft/train \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model Llama-2-7b-chat-hf --workers 8

Record formats and templates: megatron/training/data/sft_formats.py and
sft_templates.py. Bad records are skipped and counted with file:line
(--strict stops at the first).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    from megatron.training.data.sft_formats import SFT_FORMATS
    from megatron.training.data.sft_templates import CHAT_TEMPLATE_CHOICES
    from megatron.training.tokenizer import TOKENIZERS, add_tokenizer_file_flags

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a .jsonl / .jsonl.gz file, a folder of them, or a quoted glob")
    p.add_argument("--output-prefix", required=True, help="path prefix of the outputs, without suffix")
    p.add_argument("--sft-format", choices=SFT_FORMATS, default="auto",
                   help="panda {input,target}; alpaca {instruction,input,output,system,history}; "
                        "chat {messages}; auto: chosen per record by its keys")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default="auto",
                   help="auto: the tokenizer's own chat template when it has one, else raw (panda), "
                        "alpaca (alpaca), chatml (chat)")
    p.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZERS))
    add_tokenizer_file_flags(p)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (one per core is right)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of counting it")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from megatron.training.data.preprocess import run_data_tool
    from megatron.training.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft, sft_report_text

    run_data_tool(args, SFTPreprocessConfig, preprocess_sft, sft_report_text)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
