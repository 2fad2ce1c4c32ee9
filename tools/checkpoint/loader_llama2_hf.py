"""Loader plugin: a Hugging Face `LlamaForCausalLM` directory (Llama 1/2/3,
GQA, tied or untied embeddings, rope_theta, rope_scaling of type linear ->
--rotary-seq-len-interpolation-factor). The tokenizer is --tokenizer-model,
else the one in the directory."""

FORMAT = "hf"
ALIASES = ("llama_hf",)


def add_arguments(group) -> None:
    pass


def load_source(args):
    from megatron.training.checkpoint_convert.llama import LlamaHFSource

    return LlamaHFSource(args.load_dir, args.tokenizer_model)
