"""--verify: next-token logits of the converted model against its source.

Both sides run in this process in fp32 on a fixed prompt: an HF directory
with `transformers.AutoModelForCausalLM`, a Megatron checkpoint with the
training driver's own model and loader (megatron/training/inference.py,
resharded on load to TP=1, PP=1).
"""

from typing import Tuple

import torch

from megatron.training.checkpoint_convert.core import ConversionError

PROMPT_LENGTH = 16


def fixed_prompt(vocab_size: int, length: int = PROMPT_LENGTH) -> torch.Tensor:
    """[1, length] token ids spread over the vocabulary, the same every run."""
    return ((torch.arange(length) * 7919 + 13) % vocab_size).unsqueeze(0)


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.training import inference

    args, model = inference.load_model(path)
    try:
        return inference.forward_logits(args, model, tokens)
    finally:
        del model
        inference.unload()


LOGITS = {"hf": hf_logits, "megatron": megatron_logits}


def compare_logits(source: Tuple[str, str], target: Tuple[str, str], vocab_size: int,
                   atol: float = 1e-3) -> Tuple[float, float]:
    """(max, mean) absolute logit difference between `source` and `target`,
    each (format, path), over the first `vocab_size` ids; raises
    ConversionError above `atol`."""
    tokens = fixed_prompt(vocab_size)
    a = LOGITS[source[0]](source[1], tokens)[..., :vocab_size]
    b = LOGITS[target[0]](target[1], tokens)[..., :vocab_size]
    diff = (a - b).abs()
    worst, mean = diff.max().item(), diff.mean().item()
    print(f"verify: logits on a {tokens.shape[1]}-token prompt, {source[0]} {source[1]} vs {target[0]} {target[1]}: "
          f"max abs diff {worst:.3g}, mean abs diff {mean:.3g} (threshold {atol:g})", flush=True)
    if not worst <= atol:
        raise ConversionError(f"verification failed: the converted model's logits differ from the source's by up to "
                              f"{worst:.3g} (> {atol:g}); the output at {target[1]} is not a faithful copy")
    return worst, mean
