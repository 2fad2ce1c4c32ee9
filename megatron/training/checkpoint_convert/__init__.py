"""Checkpoint conversion: Hugging Face <-> Megatron, and Megatron TP/PP resharding.

The protocol between a loader and a saver (tools/checkpoint/util.py plugs them
together) is `ModelSource` in `core.py`: the model's Megatron flags as a dict,
and random access to full (un-sharded) tensors under megatron-core's GPTModel
state-dict names with global layer indices, one layer at a time. A loader
turns its format into that; a saver cuts it into its own. Memory stays near
one layer plus one output file, whatever the model size.

    core.py              ModelSource, ConversionError, staged_output, convert
    megatron_format.py   this project's per-rank checkpoints: MegatronSource, save_megatron
    hf_files.py          HF weight files: lazy reader (safetensors / .bin), sharded safetensors writer
    llama.py             the Llama family: HF config <-> Megatron flags, HF <-> Megatron name tables
    verify.py            next-token logits of both sides on a fixed prompt
"""
