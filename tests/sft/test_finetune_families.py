"""`python finetune.py NAME` end to end on the bases FinLoRA's configurations
name beside Llama 2: the shipped Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct
entries of finetune_configs.json, each on a tiny test-made base of that
family (transformers' LlamaConfig with Llama 3.1's rope scaling, Qwen2Config
with q/k/v biases and tied embeddings) with a word tokenizer: preprocess,
convert, 8-bit QLoRA training, export to peft and to a merged HF model of the
base's own class (the base's config.json, generation_config.json and
tokenizer files kept byte for byte), which transformers and peft load and
which agree."""

import filecmp
import json
import os

import pytest
import torch

from megatron.training.checkpoint_convert.adapters import dequantized_as_trained
from tests.sft.conftest import make_word_tokenizer, write_jsonl
from tests.sft.test_finetune_config import REPO

WORDS = "what is the sentiment of this news ? acme beats forecast misses estimates positive negative".split()
RECORDS = [{"context": f"what is the sentiment of this news ? acme {event}", "target": label}
           for event, label in (("beats forecast", "positive"), ("misses estimates", "negative"))] * 8
HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASES = {  # shipped configuration: (model_type, the tiny base's config, the class its export must have)
    "sentiment_llama_3_1_8b_8bits_r8": ("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=131072, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "LlamaForCausalLM"),
    "sentiment_qwen2_5_7b_8bits_r8": ("qwen2", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0), "Qwen2ForCausalLM"),
}


def make_base(path, model_type, config):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, vocab = make_word_tokenizer(path, WORDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=len(vocab), **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)  # Qwen2's q/k/v biases, non-zero so that losing them would show
    model.save_pretrained(path)
    return str(path)


def dequantized_base(base):
    """The base as the 8-bit training saw it: bitsandbytes' int8 format, dequantised (its equality with
    bitsandbytes is tests/training/peft/test_qlora.py's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(HF_LINEARS):
                module.weight.copy_(dequantized_as_trained(module.weight, 8, torch.float32))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BASES))
def test_shipped_family_configuration_runs_end_to_end(tmp_path, capfd, name):
    """The Qwen2 run exports the merged model too (the Llama run only the adapter, to save a process:
    the merged Llama 3 export is test_families.py's), which equals peft over the base it trained on."""
    import finetune
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_type, config, architecture = BASES[name]
    with open(os.path.join(REPO, "finetune_configs.json")) as f:
        shipped = json.load(f)[name]
    base = make_base(tmp_path / "base", model_type, config)
    entry = dict(shipped, base_model=base, dataset_path=write_jsonl(tmp_path / "train.jsonl", RECORDS),
                 save_dir=str(tmp_path / "out"), num_epochs=1, batch_size=4, gradient_accumulation_steps=1,
                 seq_length=32, bf16=False, layout={}, log_interval=1,  # the same keys, sized for this machine
                 export_hf=model_type == "qwen2")
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({name: entry}))
    assert finetune.main([name, "--configs", str(configs)]) == 0
    log = capfd.readouterr().out
    assert "--lora-rank 8" in log and "--lora-quant-bits 8" in log and "--use-checkpoint-args" in log
    out = tmp_path / "out"
    with open(out / "base" / "release" / "mp_rank_00" / "model_optim_rng.pt", "rb") as f:
        recorded = torch.load(f, weights_only=True)["args"]
    assert recorded["hf_model_type"] == model_type and recorded["add_qkv_bias"] == (model_type == "qwen2")
    assert recorded["use_rope_scaling"] == (model_type == "llama") and recorded["rope_scaling_factor"] == 8.0

    tokens = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(tokens).logits
        adapted = PeftModel.from_pretrained(dequantized_base(base), str(out / "adapter"))(tokens).logits
    assert (adapted - plain).abs().max() > 1e-3, "training should have moved the model"
    tokenizer_files = [n for n in os.listdir(base) if n.startswith("tokenizer") or n.startswith("chat_template")]
    for name in tokenizer_files:  # beside the adapter, byte for byte
        assert filecmp.cmp(os.path.join(base, name), out / "adapter" / name, shallow=False), name
    if entry["export_hf"]:
        with open(out / "hf" / "config.json") as f:
            assert json.load(f)["architectures"] == [architecture]
        # the base's own metadata, byte for byte: nothing in it changes for an fp32 model of the same shape
        for name in ["config.json", "generation_config.json", *tokenizer_files]:
            assert filecmp.cmp(os.path.join(base, name), out / "hf" / name, shallow=False), name
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)(tokens).logits
        assert (adapted - merged).abs().max().item() <= 1e-4
