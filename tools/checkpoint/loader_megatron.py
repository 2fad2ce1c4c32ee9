"""Loader plugin: this project's checkpoints (any TP / PP / virtual-PP layout).
--tokenizer-model overrides the tokenizer path recorded in the checkpoint."""

FORMAT = "megatron"
ALIASES = ("mcore",)


def add_arguments(group) -> None:
    pass


def load_source(args):
    from megatron.training.checkpoint_convert.megatron_format import MegatronSource

    return MegatronSource(args.load_dir, args.tokenizer_model)
