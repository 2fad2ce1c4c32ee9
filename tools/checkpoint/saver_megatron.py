"""Saver plugin: this project's checkpoint format under any TP / PP (/ VP)
layout, the vocabulary padded to a multiple of
--make-vocab-size-divisible-by x TP. A Hugging Face source is saved as a
`release` checkpoint (training starts at iteration 0 from its weights); a
Megatron source keeps its iteration (weights only: resume with
--no-load-optim --no-load-rng, or --finetune). An adapter source (an adapter
checkpoint, or --loader peft over this project's base checkpoint) is written
as an adapter-only checkpoint naming its base, to continue training; with
--merge-adapters, as a full checkpoint with the adapters merged in."""

import importlib.util

FORMAT = "megatron"
ALIASES = ("mcore",)


def add_arguments(group) -> None:
    group.add_argument("--target-tensor-parallel-size", type=int, default=None,
                       help="default: the source's (1 for an HF model)")
    group.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                       help="default: the source's (1 for an HF model)")
    group.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="default: the source checkpoint's, else 128")
    group.add_argument("--target-params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="default: keep the source's dtype")
    group.add_argument("--saver-transformer-impl", choices=["local", "transformer_engine"], default=None,
                       help="the layer implementation the checkpoint's names are for (they differ for the norms); "
                            "default: what pretrain_gpt.py picks on this machine")
    group.add_argument("--merge-adapters", action="store_true",
                       help="an adapter source is written merged into its base (a full checkpoint), not adapter-only")


def save(args, source, out_dir):
    from megatron.training.checkpoint_convert.core import DTYPES
    from megatron.training.checkpoint_convert.adapters import MergedSource
    from megatron.training.checkpoint_convert.megatron_format import save_megatron

    if source.adapter is not None and args.merge_adapters:
        source = MergedSource(source)
    impl = args.saver_transformer_impl or (
        "transformer_engine" if importlib.util.find_spec("transformer_engine") else "local")
    if source.args.get("apply_residual_connection_post_layernorm"):
        impl = "local"  # post-LN BERT keeps its norms as separate modules under Transformer Engine too
    tp = args.target_tensor_parallel_size or getattr(source, "tp", 1)
    pp = args.target_pipeline_parallel_size or getattr(source, "pp", 1)
    return save_megatron(source, out_dir, tp, pp, args.target_num_layers_per_virtual_pipeline_stage,
                         args.make_vocab_size_divisible_by, DTYPES.get(args.target_params_dtype), impl)
