"""The reference model of preference tuning, computed in the same pipeline
pass as the policy.

Modes (preference/arguments.py):
- adapters: the policy's own chunk with its adapters switched off
  (peft/model.py adapters_disabled), in eval mode: no second copy of the weights.
- copy: a frozen copy of each model chunk, built by the same provider and
  loaded from --ref-load with the driver's loader (any saved layout); eval
  mode, no gradients, outside the DDP wrapper, the optimizer and the checkpoints.
  Its memory: the weights once more (the planner counts it).
- precomputed / none: the forward pass is the policy's alone.

One pipeline pass for both: every stage runs its policy chunk on the policy
half of the incoming activations and its reference chunk, under no_grad, on
the reference half, and sends both on, concatenated along the batch
dimension ([s, 2 x sequences, h]); the last stage's output is the per-token
loss of all rows, [policy sequences; reference sequences]. So the schedule
(and its micro-batch size, args.sequences_per_sample = 4 per pair) sees one
model, the loss function on the last stage sees both, and back-propagation
reaches the policy half only.
"""

import contextlib
import copy
from typing import Dict, Optional

import torch


def unwrap_gpt(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder"):
        model = model.module
    return model


@contextlib.contextmanager
def frozen_base(model):
    """`model` in eval mode, with its adapters (if any) switched off: the
    weights the run started from, for the reference pass."""
    from megatron.training.peft.model import adapted_modules, adapters_disabled

    gpt = unwrap_gpt(model)
    training = gpt.training
    gpt.eval()
    adapted = any(True for _ in adapted_modules(gpt))
    try:
        with adapters_disabled([gpt]) if adapted else contextlib.nullcontext():
            yield model
    finally:
        gpt.train(training)


class Reference:
    """The reference of one run: `mode` adapters, copy, precomputed or None."""

    def __init__(self, mode: Optional[str]):
        self.mode = mode
        self.copies: Dict[Optional[int], torch.nn.Module] = {}  # vp_stage -> frozen copy of that chunk

    @property
    def live(self) -> bool:
        """Whether the reference runs in the training forward pass."""
        return self.mode in ("adapters", "copy")

    def add_copy(self, args, config, build, pre_process, post_process, vp_stage) -> None:
        """Build the frozen copy of one chunk (the RNG is left as it was, so the
        policy initialises as without it); with the last chunk of this rank,
        load them all from --ref-load."""
        with torch.random.fork_rng(devices=[]):
            chunk = build(args, config, pre_process, post_process, vp_stage)
        for param in chunk.parameters():
            param.requires_grad_(False)
        self.copies[vp_stage] = chunk
        vp = args.virtual_pipeline_model_parallel_size
        if vp_stage is None or vp_stage == vp - 1:
            self._load(args, config)

    def _load(self, args, config) -> None:
        from megatron.core.transformer.module import Float16Module

        from megatron.training import initialize, training

        chunks = [self.copies[k] for k in sorted(self.copies, key=lambda k: -1 if k is None else k)]
        ref_args = copy.copy(args)
        ref_args.load, ref_args.finetune, ref_args.ckpt_step = args.ref_load, True, None
        training.load_checkpoint(ref_args, chunks, None, None)
        for key, chunk in zip(sorted(self.copies, key=lambda k: -1 if k is None else k), chunks):
            chunk.to(initialize.device())
            chunk = Float16Module(config, chunk) if args.fp16 or args.bf16 else chunk
            self.copies[key] = chunk.eval()

    @contextlib.contextmanager
    def computing(self, model):
        """The module that computes the reference for the policy chunk `model`."""
        if self.mode == "copy":
            yield self.copies[unwrap_gpt(model).vp_stage]
        else:
            with frozen_base(model):
                yield model


def policy_and_reference(model, reference: Optional[Reference], tokens: torch.Tensor, position_ids: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """One chunk's forward for the rows [policy; reference] (module doc);
    the policy's alone without a live reference."""
    gpt = unwrap_gpt(model)
    if reference is None or not reference.live:
        return model(tokens, position_ids, None, labels=labels)
    incoming = None if gpt.pre_process else gpt.decoder.input_tensor
    if incoming is not None:
        half = incoming.shape[1] // 2
        gpt.set_input_tensor(incoming[:, :half])
    output = model(tokens, position_ids, None, labels=labels)
    with torch.no_grad(), reference.computing(model) as ref_model:
        if incoming is not None:
            unwrap_gpt(ref_model).set_input_tensor(incoming[:, half:].detach())
        ref_output = ref_model(tokens, position_ids, None, labels=labels)
    return torch.cat([output, ref_output], dim=0 if gpt.post_process else 1)

