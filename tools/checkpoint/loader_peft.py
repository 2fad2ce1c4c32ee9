"""Loader plugin: a peft LoRA / RSLoRA / DoRA adapter directory
(adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained`
writes) over its base model, --base-load-dir: this project's checkpoint (then
`--saver megatron` writes an adapter-only checkpoint that continues training)
or a Hugging Face directory (then `--saver hf` writes the merged model). Every
key is checked against the base: a missing or unexpected key, or a wrong shape,
is an error naming the key and the file."""

FORMAT = "peft"
ALIASES = ()


def add_arguments(group) -> None:
    group.add_argument("--base-load-dir", default=None,
                       help="the base model the adapter was trained on: this project's checkpoint or an HF directory")


def load_source(args):
    from megatron.training.checkpoint_convert.adapters import open_peft_source
    from megatron.training.checkpoint_convert.core import ConversionError

    if args.verify:
        raise ConversionError("--verify runs HF and Megatron models, not a peft directory: verify what this "
                              "import writes afterwards (--loader megatron --load-dir <it> --saver hf --verify)")
    return open_peft_source(args.load_dir, args.base_load_dir, args.tokenizer_model)
