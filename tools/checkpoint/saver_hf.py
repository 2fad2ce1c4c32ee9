"""Saver plugin: a Hugging Face directory of the --model-type's family, with
safetensors shards + index, config.json and the tokenizer files
(--tokenizer-model, else the tokenizer recorded in the checkpoint).
GPT: the family the model was converted from (`LlamaForCausalLM`,
`MistralForCausalLM`) or its settings make (`Qwen2ForCausalLM` with
--add-qkv-bias, `Qwen3ForCausalLM` with --qk-layernorm), loadable by
`transformers.AutoModelForCausalLM` and vLLM (rope_scaling linear from
--rotary-seq-len-interpolation-factor, llama3 from --use-rope-scaling;
generation_config.json). BERT: BERT / RoBERTa / Megatron-BERT as the
checkpoint's layers say, the class by its heads (*ForSequenceClassification,
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


def save(args, source, out_dir):
    from megatron.training.checkpoint_convert.adapters import MergedSource
    from megatron.training.checkpoint_convert.core import DTYPES
    from megatron.training.checkpoint_convert.families import family
    from megatron.training.checkpoint_convert.hf_files import parse_size

    if source.adapter is not None:
        source = MergedSource(source)
    return family(args.model_type).save_hf(source, out_dir, DTYPES.get(args.target_params_dtype),
                                           args.make_vocab_size_divisible_by, parse_size(args.max_shard_size),
                                           args.tokenizer_model)
