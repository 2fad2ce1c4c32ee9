"""Logits from a checkpoint under any TP/PP layout.

    args, model = load_model(load_dir, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    logits = forward_logits(args, model, tokens)   # [batch, seq, padded vocab], fp32, on every rank
    unload()                                       # before loading another model in this process

All three are collective: every rank of the job calls them (the world size a
multiple of TP x PP; further ranks are data-parallel replicas that compute the
same). The model is built by the driver's own set-up: flags from the
checkpoint (--use-checkpoint-args), parallel state, megatron-core's GPTModel
with the Llama spec, and the driver's checkpoint loader, which reshards a
checkpoint saved under another layout on load. The forward pass is
megatron-core's pipeline schedule in forward-only mode; the last stage
gathers the vocabulary shards over TP and broadcasts them to the other stages.
No tokenizer files are needed: the model takes token ids. An adapter
checkpoint (megatron/training/peft) gives its base's logits with the adapters
applied.
"""

from typing import List, Sequence, Tuple

import torch

from megatron.training import arguments, initialize, training
from megatron.training.checkpoint.save_load import read_checkpoint_args
from megatron.training.models.llama import build_gpt_model
from megatron.training.peft.arguments import adapter_flags, adapters_enabled


def inference_argv(load_dir: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   extra_argv: Sequence[str] = ()) -> List[str]:
    """Driver flags that build the checkpoint's model for a forward pass."""
    saved = read_checkpoint_args(load_dir)
    argv = [
        "--load", load_dir, "--use-checkpoint-args", "--finetune", "--skip-train",
        "--micro-batch-size", "1", "--lr", "0", "--train-iters", "0", "--eval-iters", "0",
        "--seq-length", str(saved.get("seq_length") or saved["max_position_embeddings"]),
        "--tensor-model-parallel-size", str(tensor_model_parallel_size),
        "--pipeline-model-parallel-size", str(pipeline_model_parallel_size),
        "--attention-dropout", "0", "--hidden-dropout", "0",
    ]
    if saved.get("tokenizer_type") is None:
        argv.append("--mock-data")  # the model's vocabulary comes from the checkpoint; no data is read
    if adapter_flags(saved):  # an adapter checkpoint: its base (named inside it) with its adapters
        argv += adapter_flags(saved) + ["--transformer-impl", "local"]
    return argv + list(extra_argv)


def load_model(load_dir: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               extra_argv: Sequence[str] = (), model_builder=build_gpt_model,
               extra_args_provider=None) -> Tuple[object, list]:
    """(args, [model chunk]) for this rank, weights loaded, in eval mode.
    `model_builder(args, config)` and `extra_args_provider` (its flags) are
    the entry point's: GPT by default, BERT in bert/inference.py."""
    args = training.setup_args(inference_argv(load_dir, tensor_model_parallel_size, pipeline_model_parallel_size,
                                              extra_argv), extra_args_provider)
    config = arguments.transformer_config_from_args(args)
    model = [model_builder(args, config)]
    if adapters_enabled(args):
        from megatron.training.peft.model import apply_adapters

        apply_adapters(args, config, model)
    model = [chunk.to(initialize.device()) for chunk in model]
    training.load_checkpoint(args, model, None, None)
    for chunk in model:
        chunk.eval()
    return args, model


@torch.no_grad()
def forward_logits(args, model: list, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, args.padded_vocab_size] (fp32) for token ids
    [batch, seq], causal attention, positions 0..seq-1; on every rank. The
    vocabulary's padding columns (ids >= args.unpadded_vocab_size) are -inf."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = tokens.to(initialize.device())
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)

    def forward_step(data_iterator, chunk):
        # No loss function: the schedule hands back the last stage's output.
        return chunk(tokens, position_ids, None), None

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=model[0], num_microbatches=1,
        seq_length=seq, micro_batch_size=batch, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0]).float().contiguous()
    else:
        logits = torch.empty(batch, seq, args.padded_vocab_size, dtype=torch.float32, device=tokens.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(logits, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return logits


def unload() -> None:
    """Forget this process's parallel layout (the process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
