"""Merge every .bin/.idx pair in a folder into one indexed dataset, streaming.

    python tools/merge_datasets.py --input shards/ --output-prefix merged/corpus_text_document
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder holding the .bin/.idx pairs (merged in name order)")
    p.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    args = p.parse_args(argv)
    from megatron.training.data.indexed_writer import DatasetFormatError
    from megatron.training.data.merge import merge_datasets
    from megatron.training.fileio import describe_os_error

    try:
        w = merge_datasets(args.input, args.output_prefix)
    except DatasetFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {describe_os_error(e)}; nothing was written", file=sys.stderr)
        return 1
    print(f"merged {w.documents:,} documents, {w.tokens:,} tokens into {args.output_prefix}.bin/.idx",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
