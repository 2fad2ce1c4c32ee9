"""Loader plugin: a Hugging Face model directory, its family read from
config.json (llama, mistral, qwen2, qwen3 -> --model-type GPT; bert, roberta,
megatron-bert -> --model-type BERT). The tokenizer is --tokenizer-model, else the one in the
directory."""

FORMAT = "hf"
ALIASES = ()


def add_arguments(group) -> None:
    pass


def load_source(args):
    from megatron.training.checkpoint_convert.core import ConversionError
    from megatron.training.checkpoint_convert.families import family, model_type_of_hf_dir

    found = model_type_of_hf_dir(args.load_dir)
    if found != args.model_type:
        raise ConversionError(f"{args.load_dir} holds a {found} model (config.json): use --model-type {found}")
    return family(found).hf_source(args.load_dir, args.tokenizer_model)
