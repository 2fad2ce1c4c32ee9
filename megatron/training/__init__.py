"""The training driver: flags, initialisation, model, data, loop and checkpoints
around the pinned pip package megatron-core (`megatron.core`)."""
