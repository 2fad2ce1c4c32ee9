"""Saver plugin: a Hugging Face directory of the --model-type's family, with
safetensors shards + index, config.json and the tokenizer files
(--tokenizer-model, else the tokenizer recorded in the checkpoint).
GPT: the family the model was converted from (`LlamaForCausalLM`,
`MistralForCausalLM`) or its settings make (`Qwen2ForCausalLM` with
--add-qkv-bias, `Qwen3ForCausalLM` with --qk-layernorm), loadable by
`transformers.AutoModelForCausalLM` and vLLM (rope_scaling linear from
--rotary-seq-len-interpolation-factor, llama3 from --use-rope-scaling;
generation_config.json; with --hf-base-dir, config.json and
generation_config.json are that directory's, changing only what the model
requires: checkpoint_convert/hf_metadata.py). BERT: BERT / RoBERTa /
Megatron-BERT as the checkpoint's layers say, the class by its heads (*ForSequenceClassification,
BertForPreTraining, *ForMaskedLM or *Model). An adapter source (a checkpoint
trained with --lora-rank, or --loader peft) is written merged into its base
model (in fp32, then cast), as peft's merge_and_unload() merges it."""

FORMAT = "hf"
ALIASES = ("llama_hf", "llama2_hf")


def add_arguments(group) -> None:
    group.add_argument("--target-params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="default: keep the source's dtype")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                       help="the exported vocabulary is the tokenizer's rounded up to this multiple (1: exact)")
    group.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    group.add_argument("--hf-base-dir", default=None,
                       help="GPT: the Hugging Face directory the model was converted from (a fine-tuned model's "
                            "base): its config.json and generation_config.json are copied, changing only the fields "
                            "the exported model requires (dtype, vocab_size, rope, max_position_embeddings, "
                            "rms_norm_eps; megatron/training/checkpoint_convert/hf_metadata.py)")


def save(args, source, out_dir):
    from megatron.training.checkpoint_convert.adapters import MergedSource
    from megatron.training.checkpoint_convert.core import DTYPES, ConversionError
    from megatron.training.checkpoint_convert.families import family
    from megatron.training.checkpoint_convert.hf_files import parse_size

    if source.adapter is not None:
        source = MergedSource(source)
    module = family(args.model_type)
    base = {}
    if args.hf_base_dir:
        if not getattr(module, "SAVES_FROM_HF_BASE", False):
            raise ConversionError(f"--hf-base-dir applies to GPT models; --model-type {args.model_type} writes its "
                                  "own config.json: drop the flag")
        base = {"hf_base_dir": args.hf_base_dir}
    return module.save_hf(source, out_dir, DTYPES.get(args.target_params_dtype), args.make_vocab_size_divisible_by,
                          parse_size(args.max_shard_size), args.tokenizer_model, **base)
