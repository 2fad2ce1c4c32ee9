"""The planner (megatron/training/planner/plan.py, tools/plan.py --dpo with finetune_dpo.py's flags) counts what
preference tuning adds: activations of two sequences (a pair) per micro-batch
element, and with a full-model reference (--pref-reference copy, the default
without adapters) the frozen copy of each stage's weights; adapters (reference
= adapters off) and precomputed log-probs add no copy."""

import pytest

from megatron.training.planner.plan import format_plan, plan_from_argv, stage_parameters

LLAMA_7B = [
    "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "11008", "--num-attention-heads", "32",
    "--seq-length", "2048", "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--bf16", "--lr", "1e-6", "--train-iters", "10", "--mock-data", "--vocab-size", "32000",
    "--use-flash-attn", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
    "--global-batch-size", "16", "--world-size", "8",
]


def test_reference_copy_and_pair_activations_are_counted():
    dpo = plan_from_argv(LLAMA_7B + ["--micro-batch-size", "1", "--dpo"])
    sft_two = plan_from_argv(LLAMA_7B + ["--micro-batch-size", "2"])  # the same sequences per micro-batch
    for stage, twin in zip(dpo.stages, sft_two.stages):
        assert stage.reference == stage_parameters(dpo.args, stage.stage) * 2  # bf16: 2 bytes per parameter
        assert stage.reference == stage.weights and stage.reference > 0
        assert stage.activations == pytest.approx(twin.activations)
        assert stage.total == pytest.approx(twin.total + stage.reference)
    assert "frozen reference copy" in format_plan(dpo)


@pytest.mark.parametrize("flags", [["--pref-reference", "precomputed"], ["--pref-loss", "simpo"],
                                   ["--lora-rank", "8", "--load", "base"]])
def test_no_copy_without_a_full_model_reference(flags):
    p = plan_from_argv(LLAMA_7B + ["--micro-batch-size", "1", "--dpo"] + flags)
    assert all(s.reference == 0 for s in p.stages) and "frozen reference copy" not in format_plan(p)
