"""Preference tuning (DPO and its variants) on the training driver.

    loss.py        per-sequence log-probs -> the losses (sigmoid, hinge, ipo, simpo) and TRL's reward metrics
    arguments.py   the --pref-* flags, LLaMA-Factory's names; the reference mode they select
    reference.py   the reference model: adapters off, a frozen copy, or none; both passes in one pipeline pass
    precompute.py  reference log-probs computed once and stored beside the data (TRL's precompute_ref_log_probs)

The data: megatron/training/data/preference_*.py; the entry point: finetune_dpo.py.
"""
