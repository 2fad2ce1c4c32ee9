"""Checkpoints: how one is found, read, checked, resharded and written.

Modules, bottom-up (each imports only from those above it in this list):

    flags.py           the package's flags (--async-save, --ckpt-checksum, --ckpt-step, ...) and their checks
    files.py           one file: atomic writes, SHA-256 manifests, weights-only reading, the .metadata index
    iterations.py      where checkpoints live: the tracker, iteration and rank directories, which are
                       complete, the iteration to fall back to, publishing, sweeping killed saves
    settings.py        the settings a checkpoint records; --use-checkpoint-args
    load_checks.py     a checkpoint that does not fit the run, as one line
    training_state.py  model chunks and layouts, the distributed optimizer's restore, fresh heads
    torch_dist/        megatron-core's distributed format (the default): state, save, load, safe reading
    reshard.py         weights saved under one TP/PP/VP layout loaded into another
    torch_format.py    Megatron-LM's per-rank format (--ckpt-format torch)
    save_load.py       save_checkpoint / load_checkpoint: the format chosen; what the driver calls

Adapter checkpoints (peft/checkpoint.py) and the converters (checkpoint_convert/)
are clients of this package; it imports neither.
"""
