"""What the two Megatron checkpoint readers of the converter share (the
per-rank torch format, megatron_format.py; torch_dist, torch_dist_format.py):
the linear layers' extra-state entries and the tokenizer's vocabulary size
behind a checkpoint's padded rows."""

import warnings
from typing import Optional

# Module names of megatron-core's linear layers: each carries an `_extra_state`
# entry (None outside FP8) that a strict load_state_dict expects.
LINEAR_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def read_vocab_size(args: dict, tokenizer_model: Optional[str] = None) -> Optional[int]:
    """The tokenizer's vocabulary size for a checkpoint's flags (None when the
    tokenizer cannot be found); `tokenizer_model` overrides the recorded path.
    A converted model with more rows than its tokenizer has tokens (Qwen2.5)
    keeps its own vocabulary (tokenizer.model_vocabulary)."""
    from megatron.training.tokenizer import build_tokenizer, model_vocabulary

    if tokenizer_model is None and args.get("unpadded_vocab_size"):  # recorded by the driver and save_megatron
        return args["unpadded_vocab_size"]
    kind = args.get("tokenizer_type")
    if kind is None:
        return args.get("vocab_size")
    model = tokenizer_model or args.get("tokenizer_model")
    try:
        tokens = build_tokenizer(kind, model, args.get("vocab_file"), args.get("merge_file"), args.get("vocab_size"))
        return model_vocabulary(tokens.vocab_size, args)
    except Exception as e:  # noqa: BLE001 - any failure means "unknown": say so and go on
        if args.get("vocab_size"):
            return args["vocab_size"]
        warnings.warn(f"cannot load the checkpoint's tokenizer ({kind} {model}: {e}); the vocabulary padding "
                      "rows are kept as they are. Pass --tokenizer-model to trim them")
        return None
