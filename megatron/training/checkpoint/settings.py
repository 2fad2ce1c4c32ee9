"""The settings a checkpoint records, and --use-checkpoint-args: the model a
checkpoint records, unless the command line says otherwise.

    state["args"] = args_to_dict(args)                   # what every checkpoint records (plain values)

    given = arguments.flags_given(argv)                  # dests the command line names
    note = take_checkpoint_settings(args, saved, given, path)   # fills args; one line to print, or None

Every model-defining setting the checkpoint's `args` record is taken from it
when the command line does not give it, so a converted model continues with
its own dropout (0 for Hugging Face models), rotary settings, position
interpolation factor and tokenizer instead of the parser's defaults. A
setting the command line does give wins: for the tensor shapes (SHAPE) a
different value cannot load the checkpoint, which is an error naming the
flag; for the others (OTHER, TOKENIZER: dropout, sequence length, position
interpolation for context extension, a tokenizer at another path, another
--make-vocab-size-divisible-by, ...) the difference is reported once, in the
returned line.

    difference = vocabulary_difference(saved, vocab)     # None: the tokenizer is the checkpoint's

tells a tokenizer with another vocabulary (an error) from the same
vocabulary padded to another size (another TP or --make-vocab-size-divisible-by:
the loaders refit the padding rows, which no token id reaches).
"""

from typing import Dict, Iterable, Optional

import torch

from megatron.training.errors import ArgumentError
from megatron.training.sizes import padded_vocab_size

# Settings that decide the shapes of the checkpoint's tensors.
SHAPE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "swiglu", "untie_embeddings_and_output_weights", "add_bias_linear",
    "normalization", "position_embedding_type", "add_position_embedding",
    "num_tokentypes",  # BERT models (bert/arguments.py)
)
# Settings of the model a run may change on purpose.
OTHER = (
    "attention_dropout", "hidden_dropout", "norm_epsilon", "init_method_std", "apply_query_key_layer_scaling",
    "seq_length", "max_position_embeddings", "rotary_base", "rotary_percent", "rotary_seq_len_interpolation_factor",
    # the vocabulary's padding (x TP): the loaders refit the padding rows, which no token id reaches
    "make_vocab_size_divisible_by",
    # BERT models (bert/arguments.py): the layer order and positions a converted model needs, its heads
    "apply_residual_connection_post_layernorm", "position_ids_offset", "bert_binary_head",
)
# The tokenizer, taken as a group: a command line naming another --tokenizer-type takes none of the rest.
TOKENIZER = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")
# Recorded values that are not flags: always the checkpoint's.
RECORDED = ("padded_vocab_size", "unpadded_vocab_size")
# {is a BERT-family model: (what to call it, the entry points that load it)}. The saved args tell the
# family one way each: every BERT checkpoint records bert_binary_head (Megatron-LM records it for GPT
# models too), and only this project's BERT checkpoints record position_ids_offset.
FAMILIES = {True: ("a BERT-family encoder", "pretrain_bert.py or finetune_classification.py"),
            False: ("a GPT (Llama) model", "pretrain_gpt.py, finetune_gpt.py or finetune.py")}
# Flags that set another setting: giving them counts as giving it.
SETS = {"use_rotary_position_embeddings": "position_embedding_type",
        "add_position_embedding": "position_embedding_type"}

def args_to_dict(args) -> dict:
    """The flags as plain Python values (for checkpoints loaded with weights_only=True)."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
    return out


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def take_checkpoint_settings(args, saved: Dict, given: Iterable[str], source: str) -> Optional[str]:
    """Set on `args` every setting `saved` (a checkpoint's args) records that
    `given` (the dests named on the command line) does not name. Raises
    ArgumentError when a given setting changes a tensor shape; returns a line
    naming the settings the command line overrides, or None when none does."""
    bert_run = hasattr(args, "bert_binary_head")
    if (bert_run and "bert_binary_head" not in saved) or (not bert_run and "position_ids_offset" in saved):
        raise ArgumentError(f"{source} holds {FAMILIES[not bert_run][0]}, and this entry point runs "
                            f"{FAMILIES[bert_run][0]}: load it with {FAMILIES[not bert_run][1]}")
    given = set(given) | {SETS[d] for d in given if d in SETS}
    if "tokenizer_type" in given and args.tokenizer_type != saved.get("tokenizer_type"):
        given |= set(TOKENIZER)  # another tokenizer: none of the recorded tokenizer files apply
    shape_conflicts, overrides = [], []
    for dest in SHAPE + OTHER + TOKENIZER + RECORDED:
        if dest not in saved:
            continue
        if dest not in given:
            setattr(args, dest, saved[dest])
        elif getattr(args, dest) != saved[dest]:
            text = f"{flag(dest)} {getattr(args, dest)} (checkpoint: {saved[dest]})"
            (shape_conflicts if dest in SHAPE else overrides).append(text)
    if shape_conflicts:
        raise ArgumentError(
            f"--use-checkpoint-args: the command line's {', '.join(shape_conflicts)} cannot load {source}, whose "
            "tensors have the checkpoint's shape: drop these flags to take the checkpoint's values")
    if not overrides:
        return None
    return (f"> --use-checkpoint-args: the model settings of {source}, except {', '.join(overrides)} from the "
            "command line")


def vocabulary_difference(saved: Dict, vocab: int) -> Optional[str]:
    """None when a tokenizer of `vocab` ids has the vocabulary of the checkpoint
    whose args are `saved` (however either pads it); else the checkpoint's
    vocabulary, in words. Checkpoints that do not record their real vocabulary
    (`unpadded_vocab_size`: Megatron-LM's) are judged by their padded rows: the
    tokenizer's ids padded as the checkpoint was must give as many."""
    recorded = saved.get("unpadded_vocab_size")
    if recorded is not None:
        return None if recorded == vocab else f"{recorded} token ids"
    rows = saved.get("padded_vocab_size")
    if rows is None:
        return None  # nothing recorded to compare with
    divisible = saved.get("make_vocab_size_divisible_by") or 128  # Megatron-LM's default
    tp = saved.get("tensor_model_parallel_size") or 1
    if padded_vocab_size(vocab, divisible, tp) == rows:
        return None
    return (f"{rows} rows (padded to a multiple of {divisible} x TP={tp}, where {vocab} ids would give "
            f"{padded_vocab_size(vocab, divisible, tp)})")
