"""Parameter-efficient fine-tuning on megatron-core's parallel layers: LoRA,
RSLoRA, DoRA and QLoRA adapters with peft's maths and parameter names.

    targets.py     Hugging Face module names -> megatron-core modules (the TARGETS table), row layouts
    arguments.py   the --lora-* flags
    layers.py      the adapters on column- and row-parallel linears (tensor/sequence parallel maths)
    quantized.py   QLoRA's frozen base: bitsandbytes' NF4 / int8 formats, per TP shard, as buffers
    model.py       apply_adapters(): freeze the base, attach the adapters (build_model's hook)
    checkpoint.py  adapter-only checkpoints naming their base; loading under any TP/PP layout

Importing this package imports neither megatron.core nor bitsandbytes.
"""
