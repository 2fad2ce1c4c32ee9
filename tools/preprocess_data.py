"""Turn jsonl into megatron-core indexed datasets ({prefix}_{key}_{document|sentence}.bin/.idx).

Same flags and, for the same input and tokenizer, the same bytes as
Megatron-LM's tools/preprocess_data.py; streams in flat memory, skips and
counts bad lines, and writes outputs under temporary names until complete.

    python tools/preprocess_data.py --input data/ --output-prefix out/corpus \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8
    # BERT masked-LM data: one sequence per sentence, no end-of-document token
    python tools/preprocess_data.py --input data/ --output-prefix out/corpus --split-sentences \\
        --tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt --workers 8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    from megatron.training.tokenizer import TOKENIZERS, add_tokenizer_file_flags

    p = Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="a .jsonl / .jsonl.gz file, a folder of them, or a quoted glob")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract; each gives its own dataset {prefix}_{key}_{level}")
    g.add_argument("--json-format", choices=["keys", "title_content"], default="keys",
                   help="keys: the --json-keys fields; title_content: PandaLLM pretraining records, "
                        "title + newline + content as one document, written as key 'text'")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (NLTK punkt if its data is installed, else a "
                        "built-in rule-based splitter; never downloads)")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    g.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad line (not JSON, missing key, empty, invalid UTF-8) "
                        "instead of skipping and counting it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZERS))
    add_tokenizer_file_flags(g)
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="Megatron-LM's legacy tokenizer semantics (BOS for Llama2Tokenizer, HF special "
                        "tokens, SentencePiece <EOD>), as its --legacy-tokenizer; default: megatron-core's")
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the outputs, without suffix")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, required=True, help="tokenizer processes (one per core is right)")
    g.add_argument("--partitions", type=int, default=1,
                   help="order documents as Megatron-LM does with this many partitions "
                        "(line i to partition i mod N); parallelism comes from --workers")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="keep input order with --partitions > 1 (as Megatron-LM's flag)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.keep_sequential_samples:
        args.partitions = 1  # contiguous partitions concatenated = input order
    return args


def run(argv=None) -> None:
    args = get_args(argv)
    from megatron.training.data.preprocess import PreprocessConfig, Report, preprocess, run_data_tool

    run_data_tool(args, PreprocessConfig, preprocess, Report.text)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
