"""Turn synthetic shards into an indexed dataset and print the --data-path
blend in which a chosen share of the sampled training tokens is synthetic.

    DATA_PATH=$(python tools/build_synthetic_blend.py --synthetic-dir synth/ \\
        --output-prefix data/synth --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model \\
        --original-data-path "data/corpus_text_document" --synthetic-fraction 0.005)

The blend goes to stdout (one line: "W1 PREFIX1 W2 PREFIX2 ..."); the table of
shares, token counts and epochs goes to stderr.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import ArgumentError, Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic-dir", help="the --output-dir of tools/generate_synthetic_data.py (preprocessed here)")
    p.add_argument("--synthetic-data-path", nargs="+",
                   help="instead of --synthetic-dir: already preprocessed synthetic dataset prefixes (or a blend)")
    p.add_argument("--output-prefix", help="with --synthetic-dir: prefix of the synthetic indexed dataset")
    p.add_argument("--tokenizer-type", help="the student's tokenizer (as for tools/preprocess_data.py)")
    p.add_argument("--tokenizer-model", help="its model file or directory")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--original-data-path", nargs="+", required=True,
                   help="the pretraining data: prefixes (weighted by their token counts) or a blend \"W1 P1 W2 P2\"")
    p.add_argument("--synthetic-fraction", type=float, required=True,
                   help="share of the sampled training tokens that is synthetic (0.005 for 0.5%%)")
    p.add_argument("--train-tokens", type=float, help="tokens the run will train on; adds epochs per dataset")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    if bool(args.synthetic_dir) == bool(args.synthetic_data_path):
        raise ArgumentError("give exactly one of --synthetic-dir (shards to preprocess) or --synthetic-data-path "
                            "(done already)")
    if args.synthetic_dir and not (args.output_prefix and args.tokenizer_type):
        raise ArgumentError("--synthetic-dir needs --output-prefix and --tokenizer-type (and --tokenizer-model): "
                            "the student's tokenizer, the one training uses")
    return args


def run(argv=None) -> None:
    args = get_args(argv)
    from megatron.training.distill.mixing import (
        describe_blend, format_data_path, preprocess_synthetic, synthetic_blend,
    )

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    synthetic = args.synthetic_data_path or [preprocess_synthetic(
        args.synthetic_dir, args.output_prefix, args.tokenizer_type, args.tokenizer_model, args.workers, log)]
    entries = synthetic_blend(args.original_data_path, synthetic, args.synthetic_fraction)
    log(describe_blend(entries, int(args.train_tokens) if args.train_tokens else None))
    print(format_data_path(entries))


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
