"""Loading a checkpoint's weights into another TP / PP / virtual-PP layout:
the per-rank torch format merged from its rank files, torch_dist through
full tensors. torch_format.py and peft/checkpoint.py call it:

    load_model_resharded(args, model, iter_dir, saved_layout, select=None, on_full=None, fresh_heads=False)
"""

from megatron.core import parallel_state

from megatron.training import sharding
from megatron.training.checkpoint.iterations import is_torch_dist, rank_file, read_checkpoint_file
from megatron.training.checkpoint.load_checks import check_state_fits
from megatron.training.checkpoint.torch_dist.full_tensors import full_groups
from megatron.training.checkpoint.training_state import head_names, model_keys, report_heads, unwrap
from megatron.training.errors import CheckpointError
from megatron.training.models.hf_names import EMBEDDING, OUTPUT_LAYER


def load_model_resharded(args, model: list, iter_dir: str, saved: dict, select=None, on_full=None,
                          fresh_heads: bool = False) -> None:
    """Load model weights saved under another TP/PP/VP layout: merge the
    source shards into full tensors, then cut this rank's part. Every rank
    maps the source files of all source ranks (memory-mapped) and merges only
    the entries it needs, one layer at a time (each is cut and loaded before
    the next is merged): its own layers, then the embedding, output layer and
    final norm where its model chunks have them.

    select(name): which of the model's state-dict entries this checkpoint
    provides (default: all). on_full(chunk, full): called with the full
    (unsharded, chunk-local names) tensors of each layer (and of the other
    entries) before they are cut, for layers that keep a transformed copy of
    them (QLoRA's quantised base). fresh_heads: head modules (`head_names`)
    the checkpoint lacks keep their initialisation and those the model lacks
    are left out, each reported (a fresh start with other heads)."""
    if saved["num_layers"] != args.num_layers:
        raise CheckpointError(f"{iter_dir} has {saved['num_layers']} layers, this run --num-layers {args.num_layers}")
    gated = bool(saved["swiglu"])
    tied = not args.untie_embeddings_and_output_weights
    offsets = sharding.layer_offsets(args.num_layers, args.pipeline_model_parallel_size,
                                     args.virtual_pipeline_model_parallel_size)
    per_chunk = args.num_layers // (args.pipeline_model_parallel_size * len(model))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    targets = [{n: v for n, v in unwrap(chunk).state_dict().items() if select is None or select(n)}
               for chunk in model]

    # What this rank needs, in global names: its layers, and the other entries its chunks hold.
    layer_ranges = [(offsets[(pp_rank, v)], offsets[(pp_rank, v)] + per_chunk) for v in range(len(model))]
    other_names = {n for target in targets for n in target if sharding.layer_index(n) is None}
    if tied and OUTPUT_LAYER in other_names:
        other_names.add(EMBEDDING)  # the output layer may have to be copied from the embedding (below)

    def needed(name: str) -> bool:
        index = sharding.layer_index(name)
        if index is None:
            return name in other_names
        return any(first <= index < end for first, end in layer_ranges)

    loaded = [set() for _ in model]

    def load(full: dict) -> None:
        """Cut full tensors (global names) for every chunk holding some of them, and load them."""
        for v, chunk in enumerate(model):
            module, target = unwrap(chunk), targets[v]
            local = sharding.match_layer_spec(sharding.to_local_names(full, offsets[(pp_rank, v)], per_chunk), target)
            if on_full is not None:
                on_full(module, local)
            names = [n for n in target if n in local]
            fitted = _fit_vocab(local, target, args.tensor_model_parallel_size)
            check_state_fits({n: fitted[n] for n in names}, target, iter_dir, args.tensor_model_parallel_size, gated,
                             strict=False)
            shard = sharding.shard_for_rank(fitted, tp_rank, args.tensor_model_parallel_size, gated, names)
            module.load_state_dict(shard, strict=False)
            loaded[v].update(names)

    others: dict = {}
    dropped: set = set()  # the checkpoint's non-layer entries this model has no place for
    if is_torch_dist(iter_dir):  # global tensors, read whole layer by layer
        layers = [i for first, end in layer_ranges for i in range(first, end)]
        groups = full_groups(iter_dir, saved["num_layers"], layers, sorted(other_names))
    else:
        groups = _rank_file_groups(iter_dir, saved, needed, gated, dropped)
    for index, merged in groups:
        if index is None:
            others.update(merged)
        else:
            load(merged)
    if OUTPUT_LAYER not in others and tied and EMBEDDING in others:
        # Tied embeddings saved without pipelining: the last stage's output layer is
        # megatron-core's copy of the word embeddings.
        others[OUTPUT_LAYER] = others[EMBEDDING]
    load(others)
    fresh = set()
    for v, target in enumerate(targets):
        missing = [n for n in target if n not in loaded[v] and not n.endswith("_extra_state")]
        if fresh_heads:
            fresh |= head_names(unwrap(model[v]), missing)
            missing = [n for n in missing if n not in fresh]
        if missing:
            raise CheckpointError(f"{iter_dir} lacks {missing[:3]}: it is not a checkpoint of this model")
    if fresh_heads:
        last = unwrap(model[-1])  # heads live on the last stage: other stages skip them by design
        report_heads(iter_dir, fresh, head_names(last, dropped) if getattr(last, "post_process", False) else set())


def _rank_file_groups(iter_dir: str, saved: dict, needed, gated: bool, dropped: set):
    """(layer index, its full tensors) merged over the TP rank files of each
    pipeline stage, for the entries `needed(name)` accepts; (None, the other
    entries) per model chunk. Global names. The non-layer entries not needed
    are added to `dropped`."""
    src_tp, src_pp = saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"]
    src_vp = saved["virtual_pipeline_model_parallel_size"]
    src_offsets = sharding.layer_offsets(saved["num_layers"], src_pp, src_vp)
    for p in range(src_pp):
        states = [read_checkpoint_file(rank_file(iter_dir, t, p, src_pp))
                  for t in range(src_tp)]
        for v, key in enumerate(model_keys(src_vp or 1)):
            chunks = [sharding.to_global_names(s[key], src_offsets[(p, v)]) for s in states]
            by_layer: dict = {}
            for name in chunks[0]:
                if needed(name):
                    by_layer.setdefault(sharding.layer_index(name), []).append(name)
                elif sharding.layer_index(name) is None:
                    dropped.add(name)
            for index, names in by_layer.items():
                yield index, sharding.merge_tp_states([{n: c[n] for n in names} for c in chunks], gated)
        del states, chunks


def _fit_vocab(local: dict, target: dict, tp: int) -> dict:
    """The full embedding/output matrices in `local` padded (zeros) or trimmed
    to this run's padded vocabulary size (the target's rows x TP)."""
    out = dict(local)
    for name in sharding.VOCAB_ROWS:
        if name in local and name in target:
            out[name] = sharding.fit_vocab_rows(local[name], target[name].shape[0] * tp)
    return out
