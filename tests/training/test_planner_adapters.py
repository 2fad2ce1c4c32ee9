"""The planner's adapter memory model (megatron/training/planner/adapters.py)
against independent references: peft's trainable-parameter count at Llama-2
7B / 70B widths, and bitsandbytes' storage of a quantized weight. (Against a
real run of the driver: tests/benchmarks/test_adapter_benchmark.py.)"""

import pytest
import torch

from megatron.training.planner import adapters as planner_adapters
from megatron.training.planner.plan import plan_from_argv

# Two layers at the real widths: the count is per layer, and peft on a full-depth
# 70B model (meta device) takes a minute.
WIDTHS = {  # hidden, ffn, heads, query groups
    "Llama-2-7B": (4096, 11008, 32, 32),
    "Llama-2-70B": (8192, 28672, 64, 8),
}
ADAPTERS = {
    "LoRA r=16 all-linear": (["--lora-rank", "16", "--lora-target-modules", "all-linear"],
                             dict(r=16, target_modules="all-linear")),
    "DoRA r=8 q,v,o,down": (["--lora-rank", "8", "--lora-use-dora", "--lora-target-modules", "q_proj", "v_proj",
                             "o_proj", "down_proj"],
                            dict(r=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
}


def _argv(model, flags, tp=1):
    hidden, ffn, heads, groups = WIDTHS[model]
    argv = ["--num-layers", "2", "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn), "--num-attention-heads",
            str(heads), "--seq-length", "4096", "--max-position-embeddings", "4096", "--normalization", "RMSNorm",
            "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--bf16", "--micro-batch-size", "1", "--lr", "1e-4",
            "--train-iters", "1", "--mock-data", "--vocab-size", "32000", "--transformer-impl", "local",
            "--load", "base", "--finetune", "--tensor-model-parallel-size", str(tp), "--world-size", str(tp)]
    if groups != heads:
        argv += ["--group-query-attention", "--num-query-groups", str(groups)]
    return argv + flags


@pytest.mark.parametrize("model", list(WIDTHS))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_trainable_parameters_are_peft_s_count(model, adapter):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, ffn, heads, groups = WIDTHS[model]
    flags, lora = ADAPTERS[adapter]
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                                          num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=groups))
        expected = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", **lora)).get_nb_trainable_parameters()[0]
    plan = plan_from_argv(_argv(model, flags))
    assert plan.stages[0].trainable == expected
    # Under TP the replicated halves (A of q/k/v/gate/up, B and magnitude of o/down) stay whole on each rank.
    tp8 = plan_from_argv(_argv(model, flags, tp=8)).stages[0]
    assert expected / 8 < tp8.trainable < expected
    assert tp8.gradients == tp8.trainable * 2 and plan.stages[0].gradients == expected * 2  # bf16 grad buffers


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bytes_are_bitsandbytes_storage(bits):
    """One HF weight [rows, cols] quantized as QLoRA stores it: bitsandbytes'
    NF4 (two codes per byte, fp32 absmax per 64-block) or int8 (fp32 absmax per row)."""
    import bitsandbytes.functional as F

    weight = torch.randn(192, 320)
    if bits == 4:
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        stored = packed.numel() * packed.element_size() + state.absmax.numel() * 4
    else:
        codes, absmax, _ = F.int8_vectorwise_quant(weight.half())
        stored = codes.numel() * codes.element_size() + absmax.numel() * 4
    assert planner_adapters.quantized_bytes(192, 320, bits) == stored


def test_frozen_base_has_no_optimizer_state_and_nf4_takes_half_a_byte():
    flags = ADAPTERS["LoRA r=16 all-linear"][0]
    full = plan_from_argv(_argv("Llama-2-70B", []))
    qlora = plan_from_argv(_argv("Llama-2-70B", flags + ["--lora-quant-bits", "4"]))
    lora = plan_from_argv(_argv("Llama-2-70B", flags))
    # bf16 with Adam: two fp32 moments, an fp32 master copy and an fp32 copy of the bf16 gradients
    assert full.stages[0].optimizer == full.stages[0].parameters * 16
    assert lora.stages[0].optimizer == qlora.stages[0].optimizer == lora.stages[0].trainable * 16
    # NF4: 0.5 byte per linear weight + 4 bytes per 64 of them, instead of 2 (bf16); plus each of the
    # 4 linear layers' table of NF4 value pairs (256 x 2 fp32), in each of the 2 layers
    linear = 2 * sum(r * c for r, c, _ in planner_adapters.linear_weight_shards(qlora.args, 1).values())
    assert qlora.stages[0].weights - lora.stages[0].weights == linear * (0.5 + 4 / 64 - 2) + 2 * 4 * 256 * 2 * 4
