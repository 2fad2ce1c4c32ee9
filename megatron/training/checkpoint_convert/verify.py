"""--verify: the converted model against its source, each run as it is saved.

A Megatron checkpoint runs under the layout it was saved with: TP x PP
processes on gloo (megatron/training/local_launch.py), each building the
training driver's own model and loader (megatron/training/inference.py) and
running megatron-core's forward pass over its shard. A Hugging Face directory
runs with `transformers.AutoModelForCausalLM` in this process. Both sides see
the same VERIFY_TOKENS token ids (rows as long as the model's context allows,
up to 256) in fp32; the report gives the largest and the mean absolute logit
difference over the tokenizer's vocabulary and each side's next-token loss
(mean cross-entropy in nats), and fails above `--verify-atol`.
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch

from megatron.training.checkpoint_convert.core import ConversionError, ModelSource

VERIFY_TOKENS = 256
VERIFY_SEED = 1234


@dataclass
class Side:
    """One model to run: its format ("hf" or "megatron"), path, and for a
    Megatron checkpoint the layout it was saved with."""

    format: str
    path: str
    tp: int = 1
    pp: int = 1


def describe(side: Side, ran) -> str:
    """`side`, with the layout its processes reported having run (tp, pp, processes) for a Megatron side."""
    if ran is None:
        return f"{side.format} {side.path}"
    tp, pp, world = ran
    return f"{side.format} {side.path} (run as saved: TP={tp} PP={pp} on {world} process{'es' if world > 1 else ''})"


@dataclass
class Comparison:
    max_abs_diff: float
    mean_abs_diff: float
    source_loss: float
    target_loss: float
    shape: Tuple[int, int]  # the token ids' [rows, length]
    ran: tuple  # per side: (TP, PP, processes) its processes reported, or None (run in this process)


def megatron_side(path: str) -> Side:
    """A Megatron checkpoint with the TP x PP layout its files were saved under
    (a virtual-pipeline layout runs its stages without interleaving)."""
    from megatron.training import checkpointing

    iteration, release = checkpointing.read_tracker(path)
    if iteration is None:
        raise ConversionError(f"{path} has no {checkpointing.TRACKER_FILENAME}: nothing to verify")
    layout = checkpointing.first_rank_state(checkpointing.iteration_dir(path, iteration, release))["layout"]
    return Side("megatron", path, layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"])


def side_of(fmt: str, path: str) -> Side:
    return megatron_side(path) if fmt == "megatron" else Side(fmt, path)


def verify_tokens(vocab_size: int, context: int, total: int = VERIFY_TOKENS) -> torch.Tensor:
    """[rows, length] token ids, `total` in all (rounded down to whole rows of
    min(context, total) tokens), uniform over the vocabulary, the same every run."""
    length = max(2, min(context, total))
    rows = max(1, total // length)
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randint(0, vocab_size, (rows, length), generator=generator)


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _megatron_worker(rank, world_size, jobs, tokens, vocab_size):
    from megatron.core import parallel_state

    from megatron.training import inference

    out = []
    for path, tp, pp in jobs:
        args, model = inference.load_model(path, tp, pp)
        try:
            ran = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(), world_size)
            out.append((inference.forward_logits(args, model, tokens)[..., :vocab_size].clone(), ran))
        finally:
            del model
            inference.unload()
    return out if rank == 0 else None


def megatron_logits(sides: List[Side], tokens: torch.Tensor, vocab_size: int) -> List[tuple]:
    """(logits, (TP, PP, processes) it ran under) of each Megatron side, each
    under its own layout, in one group of processes (the least common multiple
    of the layouts' sizes: further ranks are data-parallel replicas)."""
    from megatron.training.local_launch import ProcessesFailed, run_processes

    world = 1
    for side in sides:
        world = world * side.tp * side.pp // math.gcd(world, side.tp * side.pp)
    jobs = [(side.path, side.tp, side.pp) for side in sides]
    try:
        return run_processes(_megatron_worker, world, (jobs, tokens, vocab_size))[0]
    except ProcessesFailed as e:
        if e.user_error is not None:
            raise e.user_error from None
        raise RuntimeError(f"--verify: the Megatron side failed on {e}") from None


def all_logits(sides: Tuple[Side, Side], tokens: torch.Tensor, vocab_size: int) -> List[tuple]:
    """([rows, length, vocab_size] fp32 logits, the layout a Megatron side ran
    under or None) of each side. The Megatron sides run first, before this
    process loads an HF model their processes would inherit."""
    megatron = [s for s in sides if s.format == "megatron"]
    from_processes = iter(megatron_logits(megatron, tokens, vocab_size) if megatron else [])
    return [next(from_processes) if s.format == "megatron" else
            (LOGITS[s.format](s.path, tokens)[..., :vocab_size], None) for s in sides]


# How each format's logits are computed in this process (the Megatron side runs in processes of its own).
LOGITS = {"hf": hf_logits}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of tokens[:, 1:] given the logits at [:, :-1]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)).item()


def compare(source: Side, target: Side, vocab_size: int, context: int) -> Comparison:
    tokens = verify_tokens(vocab_size, context)
    (a, ran_a), (b, ran_b) = all_logits((source, target), tokens, vocab_size)
    diff = (a - b).abs()
    return Comparison(diff.max().item(), diff.mean().item(), next_token_loss(a, tokens), next_token_loss(b, tokens),
                      tuple(tokens.shape), (ran_a, ran_b))


def verify_conversion(source: ModelSource, target_format: str, target_path: str, atol: float) -> Comparison:
    """Compare `source` with its conversion at `target_path` (module doc); print
    one line; raise ConversionError when the logits differ by more than `atol`."""
    vocab = source.vocab_size or source.args["padded_vocab_size"]
    context = source.args.get("max_position_embeddings") or source.args.get("seq_length") or VERIFY_TOKENS
    src, dst = side_of(source.format, source.path), side_of(target_format, target_path)
    result = compare(src, dst, vocab, context)
    rows, length = result.shape
    print(f"verify: logits on {rows * length} tokens ({rows} x {length}), "
          f"{describe(src, result.ran[0])} vs {describe(dst, result.ran[1])}: max abs diff {result.max_abs_diff:.3g}, "
          f"mean abs diff {result.mean_abs_diff:.3g}; next-token loss {result.source_loss:.6f} vs "
          f"{result.target_loss:.6f} (diff {abs(result.source_loss - result.target_loss):.3g}); "
          f"threshold {atol:g}", flush=True)
    if not result.max_abs_diff <= atol:
        raise ConversionError(
            f"verification failed: the converted model's logits differ from the source's by up to "
            f"{result.max_abs_diff:.3g} (> --verify-atol {atol:g}); the output at {target_path} is not a faithful "
            "copy")
    return result
