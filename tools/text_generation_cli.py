"""Generate text from a Megatron checkpoint (any TP/PP) or an HF model directory.

    python tools/text_generation_cli.py --load ckpt --prompt "The capital of France is" --max-new-tokens 32
    torchrun --nproc_per_node 2 tools/text_generation_cli.py --load ckpt --tensor-model-parallel-size 2 \\
        --prompt "def fib(n):" --temperature 0.8 --top-p 0.9 --seed 7
    python tools/text_generation_cli.py --load ckpt            # prompts from stdin, one per line

Greedy by default (--temperature 0). For serving an exported model, see
docs/evaluation.md (vLLM).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    from tasks.lm import add_model_args

    p = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per line of stdin")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-length", type=int, default=0, help="context tokens kept while generating (0: all)")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    return p


def run(argv=None) -> None:
    from tasks.generation import generate
    from tasks.lm import build_language_model, document_prefix, encode, require_tokenizer

    args = build_parser().parse_args(argv)
    lm = build_language_model(args)
    try:
        require_tokenizer(lm, "text generation")
        prompts = args.prompt if args.prompt else [line.rstrip("\n") for line in sys.stdin]
        stop = None if args.no_stop else [lm.tokenizer.eod]
        for prompt in prompts:
            prompt_ids = encode(lm.tokenizer, prompt)
            new = generate(lm, document_prefix(lm.tokenizer) + prompt_ids, args.max_new_tokens, args.temperature,
                           args.top_k, args.top_p, args.seed, stop, args.max_length)
            if lm.is_writer:
                # decoded with the prompt: a continuation alone would lose its word boundaries
                print(lm.tokenizer.detokenize(prompt_ids + [t for t in new if not stop or t not in stop]), flush=True)
    finally:
        lm.close()


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
