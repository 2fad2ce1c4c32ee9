"""Helpers shared by the adapter tests: real peft adapters on tiny random HF Llama models."""

import torch

from tests.tools.checkpoint.test_conversion import make_hf_model  # noqa: F401 - shared with the adapter tests
from tools.checkpoint import util

# GQA (4 heads, 2 groups) so the q and k/v adapters have different shapes; untied or tied embeddings.
HF_MODELS = {
    "untied": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
    "tied": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True),
    # widths that are multiples of 64: transformers + bitsandbytes (0.50.2) dequantize NF4 right on CPU
    # only then, so this is the QLoRA reference's base
    "wide": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
}


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_peft_adapter(hf_dir, out_dir, seed=1, **lora):
    """A peft adapter over `hf_dir` with random non-zero A, B (and DoRA magnitudes
    away from the base's row norms), saved as peft saves it. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(hf_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(out_dir))
    return model.eval()


def convert(loader, saver, load, save, *extra):
    """tools/checkpoint/util.py in-process; returns its exit code."""
    return util.main(["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", str(load),
                      "--save-dir", str(save), *map(str, extra)])


def to_megatron_base(hf_dir, save):
    assert convert("llama2_hf", "megatron", hf_dir, save, "--target-tensor-parallel-size", 1,
                   "--make-vocab-size-divisible-by", 8) == 0
    return str(save)


def safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))
