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

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.training.checkpoint_convert.core import DTYPES, convert, run_command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Llama checkpoints: Megatron <-> Hugging Face", allow_abbrev=False)
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
    p.add_argument("--verify", action="store_true", help="compare next-token logits of both sides")
    return p


def print_structure(source) -> None:
    """Name, shape and dtype of every tensor of `source`, layer by layer."""
    parts = [source.embedding()] + [source.layer(i) for i in range(source.num_layers)] + [source.final()]
    for part in parts:
        for name, t in part.items():
            print(f"{name:70s} {str(tuple(t.shape)):>20s} {str(t.dtype).replace('torch.', '')}")


def run(args) -> None:
    dtype = DTYPES.get(args.target_params_dtype)
    if args.convert_checkpoint_from_megatron_to_transformers:
        from megatron.training.checkpoint_convert.hf_files import parse_size
        from megatron.training.checkpoint_convert.llama import save_llama_hf
        from megatron.training.checkpoint_convert.megatron_format import MegatronSource

        source, target_format = MegatronSource(args.load_path, args.tokenizer_model), "hf"

        def save(src, out):
            save_llama_hf(src, out, dtype, args.make_vocab_size_divisible_by or 1,
                          parse_size(args.max_shard_size), args.tokenizer_model)
    else:
        from megatron.training.checkpoint_convert.llama import LlamaHFSource
        from megatron.training.checkpoint_convert.megatron_format import save_megatron

        source, target_format = LlamaHFSource(args.load_path, args.tokenizer_model), "megatron"

        def save(src, out):
            save_megatron(src, out, args.target_tensor_model_parallel_size,
                          args.target_pipeline_model_parallel_size, None, args.make_vocab_size_divisible_by,
                          dtype)
    if args.print_checkpoint_structure:
        print_structure(source)
    convert(source, save, args.save_path, target_format, 1e-3 if args.verify else None)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
