"""Reference log-probs computed once and stored beside the data
({prefix}_ref_logps.npz, data/preference_dataset.py), as TRL's
`precompute_ref_log_probs`: the training pass then runs the policy alone.

finetune_dpo.py calls `precompute_missing` before training with
--pref-reference precomputed: for the training (and validation) prefix
without a file, the reference (--ref-load, by default the --load checkpoint a
--finetune run starts from; with adapters the base, adapters off) makes one forward-only pass over the pairs
in file order through megatron-core's pipeline schedule, in the run's own
layout (TP, PP, DP; each data-parallel replica takes its share of every
step), and the last stage writes the file (temporary name, then rename).
"""

import copy
import os
from functools import partial
from typing import List

import numpy as np
import torch

from megatron.training.data.preference_dataset import (
    PreferenceDataError, PreferenceDataset, ref_logps_path, split_pair_batch, write_ref_logps,
)
from megatron.training.preference.loss import sequence_logps
from megatron.training.preference.reference import frozen_base


def missing_prefixes(args) -> List[str]:
    """The data prefixes of this run whose reference log-probs are still to compute."""
    if args.pref_reference != "precomputed":
        return []
    prefixes = list(args.data_path or [])[:1]
    if args.valid_data_path and args.eval_iters:
        prefixes.append(args.valid_data_path)
    return [p for p in prefixes if not os.path.exists(ref_logps_path(p))]


def _logps_only(loss_mask, output):
    logps = sequence_logps(output, loss_mask)
    return logps.sum() * 0.0, {"logps": logps}


def _reference_step(data_iterator, model):
    tokens, labels, loss_mask, position_ids, _ = split_pair_batch(next(data_iterator), _device())
    with frozen_base(model) as reference:
        output = reference(tokens, position_ids, None, labels=labels)
    return output, partial(_logps_only, loss_mask)


def _device():
    from megatron.training.initialize import device

    return device()


@torch.no_grad()
def reference_logps(args, model: list, dataset: PreferenceDataset) -> np.ndarray:
    """[pairs, 2] reference log-probs of `dataset` (in its order), complete on
    the last pipeline stage (zeros elsewhere). Collective over the job."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n, m, k = len(dataset), args.micro_batch_size, args.num_microbatches
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_step = m * dp * k
    steps = -(-n // per_step)
    out = torch.zeros(steps, k, dp, m, 2, dtype=torch.float64)
    collate = torch.utils.data.default_collate
    last = parallel_state.is_pipeline_last_stage()
    for step in range(steps):
        # micro-batch j of replica r: pairs first + (j * dp + r) * m ...; the last step wraps around (then cut)
        first = step * per_step
        batches = [collate([dataset[(first + (j * dp + dp_rank) * m + i) % n] for i in range(m)]) for j in range(k)]
        results = get_forward_backward_func()(
            forward_step_func=_reference_step, data_iterator=[iter(batches) for _ in model] if len(model) > 1
            else iter(batches), model=model if len(model) > 1 else model[0], num_microbatches=k,
            seq_length=args.seq_length, micro_batch_size=2 * m, forward_only=True)
        local = torch.zeros(k, m, 2, dtype=torch.float64, device=_device())
        if last:
            for j, r in enumerate(results):
                local[j] = r["logps"].double().view(2, m).t()
        gathered = [torch.zeros_like(local) for _ in range(dp)]
        torch.distributed.all_gather(gathered, local, group=parallel_state.get_data_parallel_group())
        out[step] = torch.stack(gathered, dim=1).cpu()
    return out.reshape(-1, 2)[:n].numpy()


def precompute_missing(argv, run, extra_args_provider) -> None:
    """Compute the missing reference log-prob files of the run `argv` (see
    the module doc); nothing when there are none. `run` is the entry point's
    PreferenceRun (its model provider builds the model)."""
    from megatron.core import parallel_state

    from megatron.training import arguments, training

    if not missing_prefixes(arguments.parse_args(argv, extra_args_provider)):
        return
    args = training.setup_args(argv, extra_args_provider)
    run.configure(args)
    prefixes = missing_prefixes(args)
    if args.ref_load is None:
        raise PreferenceDataError(f"{ref_logps_path(prefixes[0])} not found: a resumed run computes no reference "
                                  "log-probs; give the reference checkpoint with --ref-load DIR")
    training.build_tokenizer_from_args(args)
    model = training.build_model(args, run.model_provider)
    ref_args = copy.copy(args)
    ref_args.load, ref_args.finetune, ref_args.ckpt_step = args.ref_load, True, None
    training.load_checkpoint(ref_args, model, None, None)
    writer = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_data_parallel_rank() == 0)
    for prefix in prefixes:
        logps = reference_logps(args, model, PreferenceDataset(prefix, args.seq_length, shuffle=False))
        if writer:
            path = write_ref_logps(prefix, logps, args.ref_load)
            print(f"> reference log-probs of {len(logps):,} pairs ({args.ref_load}) written to {path}", flush=True)
        torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
