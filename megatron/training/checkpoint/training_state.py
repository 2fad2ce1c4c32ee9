"""The model and optimizer as both checkpoint formats see them: the model
chunks' keys and wrappers, the parallel layout a checkpoint records, the
distributed optimizer's parameter-state restore, and the heads a fresh start
may change (a classifier from a pretrained encoder).
"""

import contextlib
from typing import List

import torch
from megatron.core import parallel_state

from megatron.training.errors import CheckpointError

CHECKPOINT_VERSION = 3.0


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers (checkpoint keys are its names)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_keys(n_chunks: int) -> List[str]:
    """The state keys of a model of `n_chunks` virtual-pipeline chunks."""
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


# ---------------------------------------------------------------- layouts

def layout(args) -> dict:
    """The parallel layout of this run, as rank files record it."""
    return {
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
    }


def saved_layout(state: dict) -> dict:
    """The parallel layout a rank file records, plus what resharding needs."""
    return dict(state["layout"], num_layers=state["args"]["num_layers"], swiglu=state["args"]["swiglu"])


def check_layout(saved: dict, args, path: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)} vs this run {v}" for k, v in layout(args).items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{path} was saved with another parallel layout ({'; '.join(diffs)}). Resume with the checkpoint's "
            "layout; or load the weights alone into this layout (resharded on load) with --finetune, or with "
            "--no-load-optim --no-load-rng; or reshard it with tools/checkpoint/util.py"
        )


# ---------------------------------------------------------------- the distributed optimizer

def param_state_optimizers(optimizer):
    """The distributed optimizers inside a (possibly chained) megatron optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if hasattr(o, "get_parameter_state_dp_zero")]


@contextlib.contextmanager
def restoring_optimizer_state(optimizer):
    """Around loading a distributed optimizer's parameter state: outside
    autograd (the copies go into views of parameters: fp32 main params alias
    the model's), keeping torch Adam's `step` (below), and untying the step
    tensors afterwards: the optimizer's load_state_dict gives every parameter
    the *same* step tensor, which torch's Adam would then increment once per
    parameter per step."""
    parts = param_state_optimizers(optimizer)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for opt in parts:
            stack.enter_context(_keeping_optimizer_step(opt))
        yield
    for opt in parts:
        for param_state in opt.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


@contextlib.contextmanager
def _keeping_optimizer_step(opt):
    """megatron-core 0.16.1 without Transformer Engine or apex uses torch's Adam,
    whose per-parameter state has a `step` tensor; the dp-zero and fully
    reshardable loaders only carry param / exp_avg / exp_avg_sq and fail on
    `step` (KeyError). The step is restored from the param groups, so keep it."""
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step)
        return original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del opt._set_main_param_and_optimizer_states


# ---------------------------------------------------------------- heads a fresh start may change

def head_names(module, names) -> set:
    """The entries of `names` under the modules a model may start afresh
    (its `fresh_head_prefixes`, e.g. BERT's LM, binary and classification heads)."""
    prefixes = tuple(getattr(module, "fresh_head_prefixes", ()))
    return {n for n in names if prefixes and n.startswith(prefixes) and not n.endswith("_extra_state")}


def heads_differ(model: list, state: dict) -> bool:
    """Whether a rank file's `state` has other heads than `model` (a fresh start then reshards)."""
    for key, chunk in zip(model_keys(len(model)), model):
        module = unwrap(chunk)
        if key in state and head_names(module, module.state_dict()) != head_names(module, state[key]):
            return True
    return False


def report_heads(iter_dir: str, fresh: set, dropped: set) -> None:
    if parallel_state.get_tensor_model_parallel_rank() or parallel_state.get_data_parallel_rank():
        return
    modules = lambda names: ", ".join(sorted({n.rsplit(".", 1)[0] for n in names}))  # noqa: E731
    if fresh:
        print(f"starting {modules(fresh)} from initialisation: {iter_dir} has no such weights", flush=True)
    if dropped:
        print(f"not loading {modules(dropped)} from {iter_dir}: this model has no such module", flush=True)
