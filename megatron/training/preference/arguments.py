"""The preference-tuning flags (LLaMA-Factory's names, with dashes), registered
with the driver's parser by finetune_dpo.py.

    --pref-loss sigmoid|hinge|ipo|simpo   the loss (preference/loss.py); default sigmoid (DPO)
    --pref-beta 0.1                       beta (IPO: tau; SimPO: its beta)
    --pref-ftx 0.0                        weight of the SFT term on the chosen responses
    --dpo-label-smoothing 0.0             conservative DPO / SimPO label smoothing, in [0, 0.5)
    --simpo-gamma 0.5                     SimPO's target margin
    --pref-reference auto|adapters|copy|precomputed
        adapters     the base with the adapters switched off, in the same forward pass (needs --lora-rank)
        copy         a frozen copy of the reference weights (--ref-load, default --load with --finetune)
        precomputed  reference log-probs computed once with them, stored beside the data ({prefix}_ref_logps.npz)
        auto         adapters with --lora-rank, else copy; SimPO has no reference
    --ref-load DIR                        the reference checkpoint (copy, precomputed); default --load with --finetune
    --valid-data-path PREFIX              held-out pairs: loss and metrics over --eval-iters batches

This module imports neither megatron.core nor arguments.py.
"""

from megatron.training.errors import ArgumentError
from megatron.training.peft.arguments import adapters_enabled
from megatron.training.preference.loss import LOSSES, SMOOTHED, PreferenceSettings, uses_reference

REFERENCE_MODES = ("auto", "adapters", "copy", "precomputed")
# Sequences per sample the pipeline carries between stages: a pair, and its reference pass when computed live.
LIVE_REFERENCES = ("adapters", "copy")


def add_preference_args(parser):
    g = parser.add_argument_group("preference tuning (DPO, IPO, hinge, SimPO)")
    if "--valid-data-path" not in parser._option_string_actions:  # the SFT flags have it too (tools/plan.py takes both)
        g.add_argument("--valid-data-path", type=str, default=None,
                       help="preprocessed held-out preference prefix; loss and reward metrics over --eval-iters "
                            "global batches of it")
    g.add_argument("--pref-loss", choices=list(LOSSES), default="sigmoid",
                   help="sigmoid (DPO), hinge, ipo, or simpo (reference-free, length-normalised)")
    g.add_argument("--pref-beta", type=float, default=0.1,
                   help="beta: how far the policy may move from the reference (IPO: its tau)")
    g.add_argument("--pref-ftx", type=float, default=0.0,
                   help="weight of an SFT term on the chosen responses (their mean token NLL), as LLaMA-Factory")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="probability that a label is flipped: conservative DPO (sigmoid) and SimPO; in [0, 0.5)")
    g.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin")
    g.add_argument("--pref-reference", choices=REFERENCE_MODES, default="auto",
                   help="the reference model: adapters (the base with adapters off), copy (a frozen copy of the "
                        "starting weights), precomputed (log-probs stored beside the data, computed first when "
                        "missing); auto: adapters with --lora-rank, else copy")
    g.add_argument("--ref-load", type=str, default=None,
                   help="--pref-reference copy or precomputed: the reference checkpoint; default the --load "
                        "checkpoint a --finetune run starts from")
    return parser


def settings_from_args(args) -> PreferenceSettings:
    return PreferenceSettings(loss=args.pref_loss, beta=args.pref_beta, label_smoothing=args.dpo_label_smoothing,
                              ftx=args.pref_ftx, simpo_gamma=args.simpo_gamma)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


def reference_mode(args):
    """The reference --pref-reference selects: None (SimPO), adapters, copy or precomputed."""
    if not uses_reference(args.pref_loss):
        return None
    if args.pref_reference == "auto":
        return "adapters" if adapters_enabled(args) else "copy"
    return args.pref_reference


def validate_preference_args(args) -> PreferenceSettings:
    """Check the flags, resolve --pref-reference (None: no reference, SimPO)
    and --ref-load, and set how many sequences a sample carries through the
    pipeline (args.sequences_per_sample). Idempotent."""
    _check(args.pref_beta > 0, f"--pref-beta {args.pref_beta:g} must be positive (DPO uses 0.1)")
    _check(args.pref_ftx >= 0, f"--pref-ftx {args.pref_ftx:g} must be 0 or more")
    _check(0.0 <= args.dpo_label_smoothing < 0.5,
           f"--dpo-label-smoothing {args.dpo_label_smoothing:g} must be in [0, 0.5)")
    _check(args.dpo_label_smoothing == 0 or args.pref_loss in SMOOTHED,
           f"--dpo-label-smoothing applies to {' and '.join(SMOOTHED)}, not --pref-loss {args.pref_loss}: drop it")
    _check(not args.mock_data,
           "preference tuning reads preprocessed pairs: give --data-path PREFIX of "
           "tools/preprocess_preference_data.py instead of --mock-data")
    _check(uses_reference(args.pref_loss) or args.pref_reference in ("auto", None),
           f"--pref-loss {args.pref_loss} has no reference model: drop --pref-reference")
    mode = reference_mode(args)
    _check(mode != "adapters" or adapters_enabled(args),
           "--pref-reference adapters is the base with the adapters switched off: add --lora-rank R, or choose "
           "copy or precomputed for full fine-tuning")
    _check(mode != "copy" or not adapters_enabled(args),
           "--pref-reference copy with adapters would keep a second copy of the frozen base: use adapters (the "
           "default with --lora-rank)")
    if mode == "copy" and args.ref_load is None:
        _check(args.finetune, "--pref-reference copy needs the reference weights: add --ref-load DIR (the checkpoint "
                              "the run started from); without it only a --finetune start takes them from --load")
        args.ref_load = args.load
    if mode == "precomputed" and args.ref_load is None and args.finetune:
        args.ref_load = args.load
    _check(args.ref_load is None or mode in ("copy", "precomputed"),
           f"--ref-load names the reference checkpoint, which --pref-reference {mode} does not use: drop it")
    args.pref_reference = mode
    args.sequences_per_sample = 4 if mode in LIVE_REFERENCES else 2
    args.trained_sequences_per_sample = 2  # the chosen and the rejected response; the rest: reference forwards
    return settings_from_args(args)
