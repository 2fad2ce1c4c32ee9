"""--verify: the converted model against its source, each run as it is saved.

A Megatron checkpoint runs under the layout it was saved with: TP x PP
processes on gloo (megatron/training/local_launch.py), each building the
training driver's own model and loader (megatron/training/inference.py) and
running megatron-core's forward pass over its shard. A Hugging Face directory
runs with `transformers.AutoModelForCausalLM` in this process. Both sides see
the same VERIFY_TOKENS token ids (rows as long as the model's context allows,
up to 256) in fp32; the report names what it compared (`Outputs.name`), gives
the largest and the mean absolute difference (logits: over the tokenizer's
vocabulary) and each side's next-token loss (mean cross-entropy in nats), and
fails above `--verify-atol`.

What each side computes is the model family's (`Outputs`, the source's
`verify_outputs`): GPT's next-token logits by default; BERT's come from
checkpoint_convert/bert.py (masked-LM or class logits, or the final hidden
states of an encoder without heads, which the report names as such).
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

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
    source_loss: Optional[float]  # None: the family reports no loss
    target_loss: Optional[float]
    shape: Tuple[int, int]  # the token ids' [rows, length]
    ran: tuple  # per side: (TP, PP, processes) its processes reported, or None (run in this process)


def megatron_side(path: str) -> Side:
    """A Megatron checkpoint with the TP x PP layout its files were saved under
    (a virtual-pipeline layout runs its stages without interleaving)."""
    from megatron.training.checkpoint.iterations import TRACKER_FILENAME, iteration_dir, read_tracker
    from megatron.training.checkpoint.save_load import first_rank_state

    iteration, release = read_tracker(path)
    if iteration is None:
        raise ConversionError(f"{path} has no {TRACKER_FILENAME}: nothing to verify")
    layout = first_rank_state(iteration_dir(path, iteration, release))["layout"]
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


def gpt_load(path: str, tp: int, pp: int):
    from megatron.training import inference

    return inference.load_model(path, tp, pp)


def gpt_forward(args, model: list, tokens: torch.Tensor, path: str) -> torch.Tensor:
    from megatron.training import inference

    return inference.forward_logits(args, model, tokens)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of tokens[:, 1:] given the logits at [:, :-1]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)).item()


def gpt_context(args: dict) -> int:
    return args.get("max_position_embeddings") or args.get("seq_length") or VERIFY_TOKENS


def same_tokens(tokens: torch.Tensor) -> torch.Tensor:
    return tokens


def gpt_outputs_name(side: Side) -> str:
    return "logits"


@dataclass(frozen=True)
class Outputs:
    """What --verify compares for a model family; module-level functions
    (a Megatron side's processes may be spawned)."""

    hf: Callable  # (HF directory, token ids) -> outputs, in this process
    load: Callable  # (checkpoint, TP, PP) -> (args, [model chunk]) on every rank of its processes
    forward: Callable  # (args, model, token ids, checkpoint) -> outputs on every rank (collective)
    loss: Optional[Callable] = None  # (outputs, token ids) -> a loss in nats reported beside; None: none
    context: Callable = gpt_context  # (the source's args) -> how many positions a row may use
    tokens: Callable = same_tokens  # the token ids this family runs on, from VERIFY_TOKENS uniform ids
    name: Callable = gpt_outputs_name  # (a side) -> what the outputs are, for the report ("logits", "hidden states")


GPT_OUTPUTS = Outputs(hf=hf_logits, load=gpt_load, forward=gpt_forward, loss=next_token_loss)


def _megatron_worker(rank, world_size, jobs, tokens, vocab_size, outputs: Outputs):
    from megatron.core import parallel_state

    from megatron.training import inference

    out = []
    for path, tp, pp in jobs:
        args, model = outputs.load(path, tp, pp)
        try:
            ran = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(), world_size)
            out.append((outputs.forward(args, model, tokens, path)[..., :vocab_size].clone(), ran))
        finally:
            del model
            inference.unload()
    return out if rank == 0 else None


def megatron_logits(sides: List[Side], tokens: torch.Tensor, vocab_size: int,
                    outputs: Outputs = GPT_OUTPUTS) -> List[tuple]:
    """(logits, (TP, PP, processes) it ran under) of each Megatron side, each
    under its own layout, in one group of processes (the least common multiple
    of the layouts' sizes: further ranks are data-parallel replicas)."""
    from megatron.training.local_launch import ProcessesFailed, run_processes

    world = 1
    for side in sides:
        world = world * side.tp * side.pp // math.gcd(world, side.tp * side.pp)
    jobs = [(side.path, side.tp, side.pp) for side in sides]
    try:
        return run_processes(_megatron_worker, world, (jobs, tokens, vocab_size, outputs))[0]
    except ProcessesFailed as e:
        if e.user_error is not None:
            raise e.user_error from None
        raise RuntimeError(f"--verify: the Megatron side failed on {e}") from None


def all_logits(sides: Tuple[Side, Side], tokens: torch.Tensor, vocab_size: int,
               outputs: Outputs = GPT_OUTPUTS) -> List[tuple]:
    """([rows, length, vocab_size] fp32 logits, the layout a Megatron side ran
    under or None) of each side. The Megatron sides run first, before this
    process loads an HF model their processes would inherit."""
    megatron = [s for s in sides if s.format == "megatron"]
    from_processes = iter(megatron_logits(megatron, tokens, vocab_size, outputs) if megatron else [])
    return [next(from_processes) if s.format == "megatron" else
            (outputs.hf(s.path, tokens)[..., :vocab_size], None) for s in sides]


def compare(source: Side, target: Side, vocab_size: int, context: int,
            outputs: Outputs = GPT_OUTPUTS) -> Comparison:
    tokens = outputs.tokens(verify_tokens(vocab_size, context))
    (a, ran_a), (b, ran_b) = all_logits((source, target), tokens, vocab_size, outputs)
    diff = (a - b).abs()
    losses = (outputs.loss(a, tokens), outputs.loss(b, tokens)) if outputs.loss else (None, None)
    return Comparison(diff.max().item(), diff.mean().item(), *losses, tuple(tokens.shape), (ran_a, ran_b))


def verify_conversion(source: ModelSource, target_format: str, target_path: str, atol: float) -> Comparison:
    """Compare `source` with its conversion at `target_path` (module doc); print
    one line; raise ConversionError when the logits differ by more than `atol`."""
    outputs = source.verify_outputs or GPT_OUTPUTS
    vocab = source.vocab_size or source.args["padded_vocab_size"]
    src, dst = side_of(source.format, source.path), side_of(target_format, target_path)
    result = compare(src, dst, vocab, outputs.context(source.args), outputs)
    what = outputs.name(dst if dst.format == "megatron" else src)  # both sides compute the same outputs
    rows, length = result.shape
    loss = "" if result.source_loss is None else (
        f"; next-token loss {result.source_loss:.6f} vs {result.target_loss:.6f} "
        f"(diff {abs(result.source_loss - result.target_loss):.3g})")
    print(f"verify: {what} on {rows * length} tokens ({rows} x {length}), "
          f"{describe(src, result.ran[0])} vs {describe(dst, result.ran[1])}: max abs diff {result.max_abs_diff:.3g}, "
          f"mean abs diff {result.mean_abs_diff:.3g}{loss}; threshold {atol:g}", flush=True)
    if not result.max_abs_diff <= atol:
        raise ConversionError(
            f"verification failed: the converted model's {what} differ from the source's by up to "
            f"{result.max_abs_diff:.3g} (> --verify-atol {atol:g}); the output at {target_path} is not a faithful "
            "copy")
    return result
