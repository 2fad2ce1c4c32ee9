"""benchmarks/adapter_finetuning.py at a tiny size, and the planner's adapter
memory against what that run holds: trainable parameters against peft's count
on the same model, and weights (quantized buffers included), gradients and
optimizer state against the bytes the driver's model and optimizer hold."""

import sys

import pytest

from tests.distributed.launcher import ROOT, run_distributed

if ROOT + "/benchmarks" not in sys.path:
    sys.path.insert(0, ROOT + "/benchmarks")
import adapter_finetuning as bench  # noqa: E402

# One process (no data-parallel bucket padding): the planner counts every
# byte the model, the gradient buffers and the optimizer hold, exactly.
MEMORY_RTOL = 0.0


# Adapter configurations without dropout (CPU keeps dropout masks in fp32 where CUDA keeps one byte,
# which the planner models), to check the planner's activations against what autograd saves.
NO_DROPOUT = ["--lora-dropout", "0", "--lora-rank"]
ACTIVATION_CONFIGS = {
    "LoRA r=16 all-linear": NO_DROPOUT + ["16", "--lora-target-modules", "all-linear"],
    "LoRA r=8 q,v": NO_DROPOUT + ["8", "--lora-target-modules", "q_proj", "v_proj"],
    "DoRA r=8 q,v": NO_DROPOUT + ["8", "--lora-target-modules", "q_proj", "v_proj", "--lora-use-dora"],
}


def _config_argv(base, flags):
    return bench.model_flags("tiny") + ["--load", base, "--finetune", "--train-iters", "1000000"] + flags


def _run_all(rank, world_size, base):
    """Write the base, then measure each method and configuration, in one process (sequentially)."""
    import pretrain_gpt
    from megatron.training import inference

    pretrain_gpt.main(bench.base_argv("tiny", base))
    inference.unload()
    runs = {name: bench.method_argv("tiny", base, name) for name in bench.METHODS}
    runs.update((name, _config_argv(base, flags)) for name, flags in ACTIVATION_CONFIGS.items())
    results = {}
    for name, argv in runs.items():
        results[name] = bench.measure(argv, blocks=1, iters=1)
        inference.unload()
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_run_all, world_size=1, args=(str(tmp_path_factory.mktemp("bench") / "base"),))[0]


def _peft_trainable(lora_flags):
    """peft's trainable-parameter count for the tiny model with these adapter flags."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, ffn, heads, groups, seq, vocab, _, _ = bench.SIZES["tiny"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=groups, tie_word_embeddings=False))
    if not lora_flags:
        return sum(p.numel() for p in model.parameters())
    flag = dict(zip(lora_flags[::2], lora_flags[1::2]))
    config = LoraConfig(r=int(flag["--lora-rank"]), lora_alpha=float(flag["--lora-alpha"]),
                        target_modules=flag["--lora-target-modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


def test_benchmark_reports_each_method_and_the_planner_matches_it(results):
    from megatron.training.planner.plan import plan_from_argv

    full, lora, qlora = (results[name] for name in bench.METHODS)
    for name in bench.METHODS:
        r = results[name]
        assert r["trainable"] == _peft_trainable(bench.METHODS[name][:8]), name
        assert r["tokens_per_s"] > 0 and r["rss_peak_mib"] >= r["rss_start_mib"]
        stage = plan_from_argv(bench.method_argv("tiny", "base", name) + ["--world-size", "1"]).stages[0]
        assert stage.trainable == r["trainable"], name
        for key in ("weights", "gradients", "optimizer"):
            assert r[key] == pytest.approx(getattr(stage, key), rel=MEMORY_RTOL, abs=0), (name, key, r[key])
    assert lora["trainable"] == qlora["trainable"] < full["trainable"]
    assert qlora["weights"] < lora["weights"] and lora["optimizer"] < full["optimizer"]

    text = bench.report("tiny", {name: results[name] for name in bench.METHODS}, 1, 1)
    assert "Ratios to full fine-tuning" in text and text.count("| Llama-2-70B |") == 6
    assert "QLoRA 4-bit NF4, r=16, all-linear" in text and "peak RSS" in text


def test_planned_adapter_activations_match_what_autograd_saves(results):
    """Differences between adapter configurations (the frozen base's share cancels):
    which frozen linears keep no input, B's r-wide inputs, DoRA's saved outputs;
    and QLoRA keeps nothing LoRA does not (its base is dequantized again in backward)."""
    from megatron.training.planner.plan import plan_from_argv

    def planned(name):
        return plan_from_argv(_config_argv("base", ACTIVATION_CONFIGS[name]) + ["--world-size", "1"]).stages[0]

    lora, qlora = (results[name] for name in list(bench.METHODS)[1:])
    assert qlora["activations"] == lora["activations"]
    qv = planned("LoRA r=8 q,v").activations
    for name in ("LoRA r=16 all-linear", "DoRA r=8 q,v"):
        measured = results[name]["activations"] - results["LoRA r=8 q,v"]["activations"]
        # LoRA: the stacked B of a fused linear is a copy kept per micro-batch (counted); DoRA also keeps
        # per-row vectors ([rows] per layer: the scale and scale - 1 counted, its norms not, < 2%)
        assert measured == pytest.approx(planned(name).activations - qv, rel=0.02), (name, measured)
