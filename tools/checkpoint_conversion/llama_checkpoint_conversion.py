"""DongwuLLM's Llama checkpoint conversion command, on this project's converter.

    python tools/checkpoint_conversion/llama_checkpoint_conversion.py \\
        --convert_checkpoint_from_megatron_to_transformers \\
        --load_path ckpt --save_path ckpt-hf --target_params_dtype bf16 \\
        --make_vocab_size_divisible_by 1 --print-checkpoint-structure

Megatron -> HF runs the same code as `tools/checkpoint/util.py --saver hf`
(any TP/PP layout, GQA, linear rope scaling exported as
rope_scaling = {"rope_type": "linear", "factor": F}). Without
--convert_checkpoint_from_megatron_to_transformers it converts HF -> Megatron
(--target_tensor_model_parallel_size / --target_pipeline_model_parallel_size).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.training.errors import Parser, run_main  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description="Llama checkpoints: Megatron <-> Hugging Face")
    p.add_argument("--convert_checkpoint_from_megatron_to_transformers", action="store_true",
                   help="Megatron -> HF (default: HF -> Megatron)")
    p.add_argument("--load_path", required=True)
    p.add_argument("--save_path", required=True)
    p.add_argument("--target_params_dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: keep the source's dtype")
    p.add_argument("--make_vocab_size_divisible_by", type=int, default=None,
                   help="HF output: the vocabulary rounded up to this multiple (default 1: exact); "
                        "Megatron output: Megatron's padding multiple (default 128)")
    p.add_argument("--target_tensor_model_parallel_size", type=int, default=1)
    p.add_argument("--target_pipeline_model_parallel_size", type=int, default=1)
    p.add_argument("--target_data_parallel_size", type=int, default=1, help="accepted for compatibility; unused")
    p.add_argument("--use_distributed_optimizer", action="store_true", help="accepted for compatibility; unused")
    p.add_argument("--tokenizer_name", "--tokenizer-model", dest="tokenizer_model", default=None,
                   help="a sentencepiece tokenizer.model or an HF tokenizer directory")
    p.add_argument("--max_shard_size", default="5GB")
    p.add_argument("--print-checkpoint-structure", action="store_true")
    p.add_argument("--megatron-path", default=None, help="accepted for compatibility; not needed")
    p.add_argument("--verify", action="store_true",
                   help="run both sides as saved on a few hundred tokens and compare logits and losses")
    return p


def print_structure(source) -> None:
    """Name, shape and dtype of every tensor of `source`, layer by layer."""
    parts = [source.embedding()] + [source.layer(i) for i in range(source.num_layers)] + [source.final()]
    for part in parts:
        for name, t in part.items():
            print(f"{name:70s} {str(tuple(t.shape)):>20s} {str(t.dtype).replace('torch.', '')}")


def plugin_argv(args) -> list:
    """The tools/checkpoint/util.py command line doing the conversion `args` asks for."""
    to_hf = args.convert_checkpoint_from_megatron_to_transformers
    argv = ["--model-type", "GPT", "--loader", "megatron" if to_hf else "llama2_hf",
            "--saver", "hf" if to_hf else "megatron", "--load-dir", args.load_path, "--save-dir", args.save_path]
    if args.tokenizer_model:
        argv += ["--tokenizer-model", args.tokenizer_model]
    if args.target_params_dtype:
        argv += ["--target-params-dtype", args.target_params_dtype]
    if args.make_vocab_size_divisible_by is not None:
        argv += ["--make-vocab-size-divisible-by", str(args.make_vocab_size_divisible_by)]
    if to_hf:
        argv += ["--max-shard-size", args.max_shard_size]
    else:
        argv += ["--target-tensor-parallel-size", str(args.target_tensor_model_parallel_size),
                 "--target-pipeline-parallel-size", str(args.target_pipeline_model_parallel_size),
                 "--saver-transformer-impl", "local"]
    if args.verify:
        argv.append("--verify")
    return argv


def run(argv=None) -> None:
    from tools.checkpoint import util

    args = build_parser().parse_args(argv)
    plugin_args, loader, saver = util.parse_args(plugin_argv(args))
    source = loader.load_source(plugin_args)
    if args.print_checkpoint_structure:
        print_structure(source)
    util.convert_and_verify(plugin_args, loader, saver, source)


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
