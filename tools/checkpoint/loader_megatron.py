"""Loader plugin: this project's and Megatron-LM's checkpoints, in either
format: the per-rank torch format (any TP / PP / virtual-PP layout) or
torch_dist (megatron-core's dist_checkpointing; layout-free), detected from
the directory. --tokenizer-model overrides the tokenizer path recorded in
the checkpoint."""

FORMAT = "megatron"
ALIASES = ("mcore", "torch_dist")


def add_arguments(group) -> None:
    pass


def load_source(args):
    from megatron.training.checkpoint_convert.core import ConversionError
    from megatron.training.checkpoint_convert.families import family
    from megatron.training.checkpoint_convert.megatron_checkpoint import open_checkpoint

    source = open_checkpoint(args.load_dir, args.tokenizer_model)
    if source.model_type != args.model_type:
        raise ConversionError(f"{args.load_dir} holds a {source.model_type} model ({source.block}.layers.*): "
                              f"use --model-type {source.model_type}")
    source.verify_outputs = family(args.model_type).VERIFY_OUTPUTS
    return source
