"""Loader plugin: a Hugging Face Llama-architecture decoder directory
(`LlamaForCausalLM` Llama 1/2/3.x, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`; GQA, tied or untied embeddings, rope_theta, rope_scaling
linear or llama3: checkpoint_convert/decoder_configs.py). The tokenizer is --tokenizer-model,
else the one in the directory."""

FORMAT = "hf"
ALIASES = ("llama_hf",)


def add_arguments(group) -> None:
    pass


def load_source(args):
    from megatron.training.checkpoint_convert.llama import LlamaHFSource

    return LlamaHFSource(args.load_dir, args.tokenizer_model)
