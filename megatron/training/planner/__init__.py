"""Planning a run without GPUs (tools/plan.py):

    plan.py       layout check, memory per GPU of each pipeline stage, FLOPs, tokens/s and tokens/day
    adapters.py   the memory model of LoRA / RSLoRA / DoRA / QLoRA training

Imports only torch and the driver's flags and FLOP count: no megatron.core.
"""
