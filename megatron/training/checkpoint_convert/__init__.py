"""Checkpoint conversion: Hugging Face <-> Megatron, and Megatron TP/PP resharding.

The protocol between a loader and a saver (tools/checkpoint/util.py plugs them
together) is `ModelSource` in `core.py`: the model's Megatron flags as a dict,
and random access to full (un-sharded) tensors under megatron-core's GPTModel
state-dict names with global layer indices, one layer at a time. A loader
turns its format into that; a saver cuts it into its own. Memory stays near
one layer plus one output file, whatever the model size.

    core.py                ModelSource, ConversionError, staged_output, convert
    hf_files.py            HF weight files: lazy reader (safetensors / .bin), sharded safetensors writer
    hf_tokenizer.py        the tokenizer beside an HF model: found, checked, exported
    families.py            --model-type -> family module; llama.py and bert.py: HF config <-> Megatron
                           flags, HF <-> Megatron tensors (name tables in models/hf_names.py)
    megatron_base.py       what the two Megatron readers share
    megatron_format.py     this project's per-rank checkpoints: MegatronSource, save_megatron
    torch_dist_format.py   torch_dist checkpoints: TorchDistSource, save_torch_dist
    megatron_checkpoint.py open_checkpoint: a Megatron checkpoint in whichever format it was saved
    peft.py adapters.py    peft adapter directories <-> adapter checkpoints; merging adapters
    fedavg.py              averaging adapters (tools/fedavg_adapters.py)
    verify.py              next-token logits of both sides on a fixed prompt
"""
