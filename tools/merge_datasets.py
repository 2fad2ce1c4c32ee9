"""Merge every .bin/.idx pair in a folder into one indexed dataset, streaming.

    python tools/merge_datasets.py --input shards/ --output-prefix merged/corpus_text_document
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, os_errors_as_output_errors, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder holding the .bin/.idx pairs (merged in name order)")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from megatron.training.data.merge import merge_datasets

    with os_errors_as_output_errors("nothing was written"):
        w = merge_datasets(args.input, args.output_prefix)
    print(f"merged {w.documents:,} documents, {w.tokens:,} tokens into {args.output_prefix}.bin/.idx",
          file=sys.stderr)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
