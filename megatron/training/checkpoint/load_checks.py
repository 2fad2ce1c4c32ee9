"""Mismatches between a checkpoint and the run loading it, as one line naming
the file, what differs and the fix, instead of torch's multi-line
`size mismatch for ...` report or megatron-core's bare AssertionError.

    check_state_fits(state, target, path)            # before module.load_state_dict(state)
    load_scheduler_state(scheduler, saved, path, args)   # instead of scheduler.load_state_dict(saved)
"""

import re
from typing import Dict, Optional

import torch

from megatron.training.errors import CheckpointError
from megatron.training.sharding import tp_partition

USE_CHECKPOINT_ARGS = "add --use-checkpoint-args to take the model settings from the checkpoint"

# (part of a state-dict name, the flags that decide that tensor's shape), first match wins.
SHAPE_FLAGS = (
    ("word_embeddings", "the vocabulary (--tokenizer-type/--tokenizer-model, --vocab-size, "
                        "--make-vocab-size-divisible-by) or --hidden-size"),
    ("output_layer", "the vocabulary (--tokenizer-type/--tokenizer-model, --vocab-size, "
                     "--make-vocab-size-divisible-by) or --hidden-size"),
    ("position_embeddings", "--max-position-embeddings or --hidden-size"),
    ("linear_qkv", "--hidden-size, --num-attention-heads, --num-query-groups or --kv-channels"),
    ("linear_proj", "--hidden-size, --num-attention-heads or --kv-channels"),
    ("linear_fc1", "--ffn-hidden-size, --hidden-size or --swiglu"),
    ("linear_fc2", "--ffn-hidden-size or --hidden-size"),
    ("norm", "--hidden-size"),
)
# (part of a state-dict name, the flags that decide whether the model has that tensor), first match wins.
PRESENCE_FLAGS = (
    ("output_layer", "--untie-embeddings-and-output-weights"),
    ("position_embeddings", "--position-embedding-type / --use-rotary-position-embeddings"),
    ("norm", "--normalization"),
    ("bias", "--disable-bias-linear"),
)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _flags_for(name: str, table) -> str:
    return next((flags for part, flags in table if part in name), "the model's settings")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def check_state_fits(state: Dict, target: Dict, path: str, tp: int = 1, gated_mlp: bool = False,
                     strict: bool = True) -> None:
    """Raise CheckpointError when `state` (read from `path`) cannot load into a
    module whose state dict is `target`: a tensor of another shape, or (with
    `strict`) a tensor missing on either side. With `tp` > 1, `state` holds
    full tensors and `target` this rank's shards of them."""
    for name, value in state.items():
        wanted = target.get(name)
        if not isinstance(value, torch.Tensor) or not isinstance(wanted, torch.Tensor):
            continue
        shape = list(wanted.shape)
        part = tp_partition(name, gated_mlp) if tp > 1 else None
        if part is not None:
            shape[part[0]] *= tp
        if list(value.shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {_shape(value)} in the checkpoint but {shape} in this model: "
                f"{_flags_for(name, SHAPE_FLAGS)} differ from the checkpoint's; {USE_CHECKPOINT_ARGS}, or give the "
                "values it was trained with")
    if not strict:
        return
    real = lambda names: sorted(n for n in names if not n.endswith("_extra_state"))  # noqa: E731
    for names, where, other in ((real(set(target) - set(state)), "lacks", state),
                                (real(set(state) - set(target)), "has extra", target)):
        if names:
            # whole layers the other side does not have at all: the number of layers differs
            whole_layers = _layers(names) - _layers(real(other)) == _layers(names) != {None}
            flags = "--num-layers" if whole_layers else _flags_for(names[0], PRESENCE_FLAGS)
            raise CheckpointError(
                f"{path} {where} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} for this model: "
                f"{flags} differs from the checkpoint's; {USE_CHECKPOINT_ARGS}")


def _layers(names) -> set:
    """The layer indices of `names` (None for names outside decoder.layers)."""
    return {int(m.group(1)) if m else None for m in map(_LAYER.match, names)}


# megatron-core's names for the scheduler settings it compares on load -> (what it is, the flags that set it).
SCHEDULE_SETTINGS = {
    "learning rate": ("peak learning rate", "--lr"),
    "minimum learning rate": ("minimum learning rate", "--min-lr"),
    "warmup iterations": ("LR warm-up length", "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction"),
    "total number of iterations": ("LR decay length",
                                   "--lr-decay-iters/--lr-decay-samples, default --train-iters/--train-samples"),
    "learning rate decay style": ("LR decay style", "--lr-decay-style"),
    "start weight decay": ("weight decay", "--weight-decay"),
    "end weight decay": ("weight decay", "--weight-decay"),
}
SAMPLE_COUNTS = ("warmup iterations", "total number of iterations")  # counted in samples by our scheduler
_MISMATCH = re.compile(r"class input value (.*) and checkpoint\s*value (.*) for (.*) do not match")


def load_scheduler_state(scheduler, saved: dict, path: str, args) -> None:
    """megatron-core's OptimizerParamScheduler.load_state_dict, with its
    assertion on a changed schedule re-raised as a CheckpointError naming
    the setting, the flags and the ways to resume."""
    if saved.get("wd_incr_style") == scheduler.wd_incr_style == "constant":
        # A constant weight decay never reads its increment length (the
        # training length): a longer --train-iters must not stop a resume.
        saved = dict(saved, wd_incr_steps=scheduler.wd_incr_steps)
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as e:
        m = _MISMATCH.search(str(e))
        if m is None:
            raise
        ours, theirs, name = m.groups()
        what, flags = SCHEDULE_SETTINGS.get(name, (name, "the LR schedule flags"))
        raise CheckpointError(
            f"{path}: the checkpoint's {what} is {_value(name, theirs, args)}, this run's ({flags}) is "
            f"{_value(name, ours, args)}: to resume, {_keep_hint(name, theirs, args)}add "
            "--use-checkpoint-opt_param-scheduler to continue the checkpoint's schedule, or "
            "--override-opt_param-scheduler to switch to this run's") from None


def _value(name: str, value: str, args) -> str:
    if name not in SAMPLE_COUNTS:
        return value
    iterations = _iterations(value, args)
    return f"{value} samples" + (f" ({iterations} iterations of {args.global_batch_size})" if iterations else "")


def _iterations(value: str, args) -> Optional[int]:
    samples = float(value)
    gbs = args.global_batch_size
    return int(samples // gbs) if samples > 0 and samples % gbs == 0 else None


def _keep_hint(name: str, theirs: str, args) -> str:
    """The flag that keeps the checkpoint's value, when one flag does it."""
    iterations = _iterations(theirs, args)
    if name == "total number of iterations" and iterations:
        return f"give --lr-decay-iters {iterations} to keep its decay, "
    return ""
