"""Saver plugin: a peft adapter directory from an adapter checkpoint (trained
with --lora-rank; any TP / PP layout) or a peft directory:
adapter_config.json (r, lora_alpha, lora_dropout, target_modules, use_rslora,
use_dora, base_model_name_or_path, ...) and adapter_model.safetensors under
peft's key names, DoRA's lora_magnitude_vector included. Load it with
`peft.PeftModel.from_pretrained(base_model, save_dir)`, or serve it with vLLM
(LoRA and RSLoRA; for DoRA serve the merged export, --saver hf)."""

FORMAT = "peft"
ALIASES = ()


def add_arguments(group) -> None:
    group.add_argument("--base-model-name-or-path", default=None,
                       help="recorded in adapter_config.json: the HF model (hub id or folder) the adapter applies to; "
                            "default: null")
    group.add_argument("--target-params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="default: keep the adapter's dtype")


def save(args, source, out_dir):
    from megatron.training.checkpoint_convert.adapters import save_peft
    from megatron.training.checkpoint_convert.core import DTYPES, ConversionError

    if args.verify:
        raise ConversionError("--verify compares HF and Megatron models: verify an adapter through its merged "
                              "export instead (--saver hf --verify)")
    return save_peft(source, out_dir, args.base_model_name_or_path, DTYPES.get(args.target_params_dtype))
