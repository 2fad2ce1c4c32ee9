"""Outputs of a BERT-family checkpoint under any TP/PP layout (converter
--verify, tests, classification scoring).

    args, model = load_bert_model(load_dir, tensor_model_parallel_size=2)
    logits = bert_outputs(args, model, tokens, output="lm")     # [b, s, padded vocab], fp32, on every rank
    inference.unload()

Collective like inference.py (every rank calls); built by the driver's own
set-up with the checkpoint's flags and loader. Outputs: "lm" masked-LM logits
gathered over TP, "binary" sentence-order logits [b, 2], "classes" classifier
logits [b, k], "hidden" the final hidden states [b, s, h].
"""

import os
from typing import Optional

import torch

from megatron.training import inference, initialize
from megatron.training.checkpoint.iterations import is_torch_dist, iteration_dir, read_tracker
from megatron.training.checkpoint.save_load import read_checkpoint_args
from megatron.training.bert.arguments import add_bert_and_classification_args
from megatron.training.bert.model import build_bert_model


def load_bert_model(load_dir: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                    extra_argv=()):
    """(args, [model chunk]) of a checkpoint written by pretrain_bert.py,
    finetune_classification.py or the converter."""
    saved = read_checkpoint_args(load_dir)
    argv = [] if not saved.get("num_classes") else ["--num-classes", str(saved["num_classes"])]
    return inference.load_model(load_dir, tensor_model_parallel_size, pipeline_model_parallel_size,
                                argv + list(extra_argv), build_bert_model, add_bert_and_classification_args)


def output_kind(load_dir: str) -> str:
    """What a checkpoint's heads compute: "classes", "lm", or "hidden" (an encoder without heads)."""
    iteration, release = read_tracker(load_dir)
    iter_dir = iteration_dir(load_dir, iteration, release)
    if is_torch_dist(iter_dir):  # global tensor names in the format's index
        from megatron.training.checkpoint.torch_dist.safe_load import SafeShardedLoadStrategy

        names = set(SafeShardedLoadStrategy().load_tensors_metadata(iter_dir))
    else:
        last = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_"))[-1]
        state = torch.load(os.path.join(iter_dir, last, "model_optim_rng.pt"), map_location="cpu",
                           weights_only=True, mmap=True)
        names = {n for key in state if key.startswith("model") for n in state[key]}
    if "classification_head.weight" in names:
        return "classes"
    return "lm" if "lm_head.dense.weight" in names else "hidden"


def _output_shape(args, output: str, batch: int, seq: int):
    return {"lm": (batch, seq, args.padded_vocab_size), "binary": (batch, 2),
            "classes": (batch, args.num_classes), "hidden": (batch, seq, args.hidden_size)}[output]


@torch.no_grad()
def bert_outputs(args, model: list, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                 tokentype_ids: Optional[torch.Tensor] = None, output: str = "lm") -> torch.Tensor:
    """`output` (module doc) for token ids [b, s] (padding_mask: 1 at tokens,
    default all ones; tokentype_ids default 0), fp32, on every rank."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = initialize.device()
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    mask = (padding_mask if padding_mask is not None else torch.ones_like(tokens)).to(device)
    types = tokentype_ids.to(device) if tokentype_ids is not None else None

    def forward_step(data_iterator, chunk):
        out = chunk(tokens, mask, tokentype_ids=types, output="hidden" if output == "hidden" else "auto")
        return out, None

    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=model[0], num_microbatches=1,
        seq_length=seq, micro_batch_size=batch, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        out = outs[0]
        if output in ("lm", "binary"):
            out = out[0] if output == "lm" else out[1]
        if output == "lm":
            out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        result = out.float().contiguous()
    else:
        result = torch.empty(_output_shape(args, output, batch, seq), dtype=torch.float32, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(result, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return result
