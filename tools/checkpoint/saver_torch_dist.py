"""Saver plugin: a torch_dist checkpoint (megatron-core's dist_checkpointing,
`--ckpt-format torch_dist`, Megatron-LM's default): global tensors that load
under any TP / PP / VP layout, so there is no target layout to choose. A
Hugging Face source is saved as a `release` checkpoint (training starts at
iteration 0 from its weights); a Megatron source keeps its iteration and
consumed samples (weights only: resume with --no-load-optim --no-load-rng,
or --finetune)."""

FORMAT = "megatron"
ALIASES = ("mcore_dist", "dist")


def add_arguments(group) -> None:
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                       help="default: the source checkpoint's, else 128 (loads under any TP: the driver refits "
                            "the padding rows to its own)")
    group.add_argument("--target-params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="default: keep the source's dtype")


def save(args, source, out_dir):
    from megatron.training.checkpoint_convert.core import DTYPES
    from megatron.training.checkpoint_convert.torch_dist_format import save_torch_dist

    return save_torch_dist(source, out_dir, args.make_vocab_size_divisible_by, DTYPES.get(args.target_params_dtype))
