"""Convert between indexed datasets (.bin/.idx) and nanoGPT flat uint16 token files.

    # ours -> nanoGPT: out/train.bin + out/val.bin
    python tools/convert_nanogpt.py to-nanogpt --input-prefix data/corpus_text_document --output-dir out --val-fraction 0.0005
    # nanoGPT -> ours: documents end after each --eod-token (e.g. 50256 for GPT-2)
    python tools/convert_nanogpt.py from-nanogpt --input out/train.bin --output-prefix data/train_text_document --eod-token 50256
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, os_errors_as_output_errors, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-nanogpt", help="indexed dataset -> train.bin/val.bin")
    a.add_argument("--input-prefix", required=True, help="dataset path without .bin/.idx")
    a.add_argument("--output-dir", required=True)
    a.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents (the last ones) in val.bin")
    b = sub.add_parser("from-nanogpt", help="flat uint16 file -> indexed dataset")
    b.add_argument("--input", required=True, help="a nanoGPT train.bin or val.bin")
    b.add_argument("--output-prefix", required=True, help="dataset path without .bin/.idx")
    b.add_argument("--eod-token", type=int, help="id that ends each document (kept in the document)")
    b.add_argument("--chunk-tokens", type=int, default=2048, help="document length when there is no --eod-token")
    b.add_argument("--vocab-size", type=int, help="store int32 when >= 65,500 (as preprocess_data would)")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from megatron.training.data.nanogpt import from_nanogpt, to_nanogpt

    with os_errors_as_output_errors("partial outputs removed",
                                    "--output-dir" if args.command == "to-nanogpt" else "--output-prefix"):
        if args.command == "to-nanogpt":
            counts = to_nanogpt(args.input_prefix, args.output_dir, args.val_fraction)
            print(f"wrote {args.output_dir}/train.bin ({counts['train']:,} tokens) and val.bin "
                  f"({counts['val']:,} tokens)", file=sys.stderr)
        else:
            w = from_nanogpt(args.input, args.output_prefix, args.eod_token, args.chunk_tokens, args.vocab_size)
            print(f"wrote {args.output_prefix}.bin/.idx: {w.documents:,} documents, {w.tokens:,} tokens",
                  file=sys.stderr)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
