"""The planner (megatron/training/planner/plan.py) against independent references:
the published activation formula, the driver's parameter and FLOPs counts,
and the bytes a real training run on CPU allocates."""

import os
import sys

import pytest

from megatron.training import flops as flops_module
from megatron.training.planner.plan import (
    layer_activation_bytes, micro_batches_in_flight, model_parameters, plan_from_argv, stage_parameters,
)
from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA

LLAMA_65B = [
    "--num-layers", "80", "--hidden-size", "8192", "--ffn-hidden-size", "22016", "--num-attention-heads", "64",
    "--seq-length", "2048", "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--bf16", "--lr", "1e-4", "--train-iters", "10", "--mock-data", "--vocab-size", "32000",
]


def _plan(argv, world_size, **flags):
    """plan_from_argv with flags given as keywords (True for a switch)."""
    extra = []
    for key, value in flags.items():
        extra += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return plan_from_argv(list(argv) + extra + ["--world-size", str(world_size)])


def test_activation_formula_matches_korthikanti_for_gpt3_style_layers():
    """Korthikanti et al. 2022, eq. 2-4: a GPT layer (MHA, GeLU 4h, dropout,
    unfused attention, 16-bit) keeps s*b*h*(34 + 5*a*s/h)/t bytes with TP+SP
    and s*b*h*(10 + 24/t + 5*a*s/(h*t)) with TP alone."""
    s, b, h, a, t = 2048, 4, 12288, 96, 8
    argv = ["--num-layers", "8", "--hidden-size", str(h), "--num-attention-heads", str(a), "--seq-length", str(s),
            "--attention-backend", "unfused",  # the paper's attention keeps its s x s scores
            "--micro-batch-size", str(b), "--bf16", "--lr", "1e-4", "--train-iters", "1", "--mock-data",
            "--vocab-size", "51200", "--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
    args = _plan(argv, t, tensor_model_parallel_size=t).args
    sbh = s * b * h
    assert layer_activation_bytes(args, sequence_parallel=True) == pytest.approx(sbh * (34 + 5 * a * s / h) / t)
    assert layer_activation_bytes(args, sequence_parallel=False) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    # Selective recomputation drops exactly the 5as/h term.
    assert layer_activation_bytes(args, True, selective=True) == pytest.approx(sbh * 34 / t)


def test_flash_gqa_swiglu_layer_keeps_qkv_output_and_three_ffn_tensors():
    """Llama layer without dropout, flash attention: per token 4h (norm and
    projection inputs) + 2q + 2kv (Q, K, V, output) + 3f (SwiGLU), 2 bytes each."""
    argv = LLAMA_65B + ["--use-flash-attn", "--group-query-attention", "--num-query-groups", "8"]
    args = _plan(argv, 8, tensor_model_parallel_size=8, sequence_parallel=True, micro_batch_size=1).args
    s, h, f, t, d = 2048, 8192, 22016, 8, 128
    expected = 2 * s * (4 * h + 2 * 64 * d + 2 * 8 * d + 3 * f) / t
    assert layer_activation_bytes(args, sequence_parallel=True) == pytest.approx(expected)


def test_in_flight_micro_batches_follow_the_schedules():
    args = _plan(LLAMA_65B, 32, pipeline_model_parallel_size=4, micro_batch_size=1, global_batch_size=64).args
    assert [micro_batches_in_flight(args, i) for i in range(4)] == [4, 3, 2, 1]
    # Interleaved (2 virtual stages): warm-up (p - i - 1) * 2 + (v - 1) * p, plus one.
    args = _plan(LLAMA_65B, 32, pipeline_model_parallel_size=4, micro_batch_size=1, global_batch_size=64,
                 num_layers_per_virtual_pipeline_stage=10).args
    assert [micro_batches_in_flight(args, i) for i in range(4)] == [11, 9, 7, 5]


def test_parameters_match_the_driver_count_and_split_over_stages():
    plan = _plan(LLAMA_65B, 32, tensor_model_parallel_size=8, pipeline_model_parallel_size=4, micro_batch_size=1)
    args = plan.args
    assert plan.parameters == flops_module.parameter_count(flops_module.ModelShape.from_args(args), False)
    assert 64e9 < plan.parameters < 66e9  # LLaMA-65B
    # TP splits everything but the norms; the stages add up to the model.
    norms_per_stage = [(80 // 4) * 2 * 8192 + (8192 if i == 3 else 0) for i in range(4)]
    total = sum(8 * (stage_parameters(args, i) - n) + n for i, n in enumerate(norms_per_stage))
    assert total == model_parameters(args)


def test_flops_are_the_megatron_model_flops_written_out():
    """Megatron-LM's model FLOPs, counted by hand for LLaMA-65B: per token and
    layer, 2 FLOPs per weight of the Q, K, V, O projections (4h^2, MHA) and
    the three SwiGLU matrices (3hf), plus QK^T and AV (2 x 2sh); then the
    logit layer (2hV); backward is twice the forward. (That the training log
    reports the same count is test_planned_flops_equal_the_driver_logged_count.)"""
    plan = _plan(LLAMA_65B, 32, tensor_model_parallel_size=8, pipeline_model_parallel_size=4, micro_batch_size=1,
                 global_batch_size=64, tflops_per_gpu=161)
    b, s, L, h, f = 64, 2048, 80, 8192, 22016
    V = 32768  # 32000 padded to a multiple of 128 x TP 8
    assert plan.args.padded_vocab_size == V
    forward_per_token = L * (2 * (4 * h * h + 3 * h * f) + 2 * 2 * s * h) + 2 * h * V
    assert plan.flops_per_iteration == pytest.approx(3 * b * s * forward_per_token, rel=1e-12)
    assert plan.seconds_per_iteration == pytest.approx(plan.flops_per_iteration / (32 * 161e12))
    assert plan.tokens_per_day == pytest.approx(64 * 2048 / plan.seconds_per_iteration * 86400)



def test_vocabulary_follows_the_driver_precedence():
    """With --tokenizer-type the tokenizer's vocabulary counts, as in the
    driver: NullTokenizer's --vocab-size ids plus its end-of-document id."""
    plain = _plan(LLAMA_65B, 1, micro_batch_size=1)
    null = _plan(LLAMA_65B, 1, micro_batch_size=1, tokenizer_type="NullTokenizer")
    assert plain.args.padded_vocab_size == 32000  # a multiple of 128 already
    assert null.args.padded_vocab_size == 32128  # 32001 up to the next multiple of 128

# ---------------------------------------------------------------- against a real run on CPU

# PP 2 x DP 2 with the distributed optimizer, bf16 weights, fp32 gradient
# buffers: every term of the memory model (per-stage split, DP sharding,
# master copy, Adam moments) is exercised.
MEASURED_LAYOUT = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16",
                   "--accumulate-allreduce-grads-in-fp32", "--micro-batch-size", "2", "--global-batch-size", "8",
                   "--train-iters", "3"]
MEASURED_ARGV = TINY_LLAMA + MOCK_DATA + SCHEDULE + MEASURED_LAYOUT


def _measure_worker(rank, world_size, argv):
    """Train with the real driver; after the last step, measure what the model
    and the optimizer hold. Also record the FLOPs the training log uses."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import pretrain_gpt
    from driver_harness import training_state_bytes
    from megatron.core import parallel_state
    from megatron.training import training
    from megatron.training.initialize import destroy

    found = {}
    original_train, original_logger = training.train, training.TrainingLogger

    def train_then_measure(args, step, model, optimizer, *rest):
        state = original_train(args, step, model, optimizer, *rest)
        found.update(stage=parallel_state.get_pipeline_model_parallel_rank(),
                     **training_state_bytes(model, optimizer))
        return state

    class RecordingLogger(original_logger):
        def __init__(self, args, flops_per_iteration):
            found["logged_flops"] = flops_per_iteration
            super().__init__(args, flops_per_iteration)

    training.train, training.TrainingLogger = train_then_measure, RecordingLogger
    try:
        pretrain_gpt.main(list(argv))
    finally:
        training.train, training.TrainingLogger = original_train, original_logger
        destroy()
    return found


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_worker, world_size=4, args=(tuple(MEASURED_ARGV),), timeout=300)


# The model ignores padding of the gradient buffers (params start at multiples
# of 64 elements, buckets end at multiples of lcm(DP, 128)) and the scalar
# Adam step counters; for this model they add < 1%. 10% is the bar.
MEMORY_RTOL = 0.10


def test_planned_weights_grads_optimizer_match_a_cpu_run(measured):
    plan = plan_from_argv(MEASURED_ARGV + ["--world-size", "4"])
    assert {m["stage"] for m in measured} == {0, 1}
    for m in measured:
        stage = plan.stages[m["stage"]]
        for key in ("weights", "gradients", "optimizer"):
            assert m[key] == pytest.approx(getattr(stage, key), rel=MEMORY_RTOL), (m["stage"], key)
        planned = stage.weights + stage.gradients + stage.optimizer
        assert m["weights"] + m["gradients"] + m["optimizer"] == pytest.approx(planned, rel=MEMORY_RTOL)
    # The distributed optimizer's state is half the replicated one at DP 2.
    assert plan.stages[0].optimizer == pytest.approx(plan.stages[0].optimizer_replicated / 2)


def test_planned_flops_equal_the_driver_logged_count(measured):
    plan = plan_from_argv(MEASURED_ARGV + ["--world-size", "4"])
    assert all(m["logged_flops"] == plan.flops_per_iteration for m in measured)


def test_planner_does_not_import_megatron_core():
    import subprocess

    code = ("import sys; sys.path.insert(0, %r); from megatron.training.planner.plan import plan_from_argv; "
            "plan_from_argv(%r); print('megatron.core' in sys.modules)") % (ROOT, MEASURED_ARGV + ["--world-size", "4"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "False"


def test_mfu_given_as_a_percentage_is_rejected_with_the_fix():
    from megatron.training.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=r"--mfu 50.0 is a fraction of the peak: give e.g. 0.5"):
        _plan(LLAMA_65B, 8, micro_batch_size=1, mfu=50)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_parameters_count_qkv_biases_and_qk_norms_as_transformers_does(family):
    """The planner's count for the flags the converter gives an HF Qwen2 (q/k/v biases, tied) or Qwen3
    (q/k norms, head_dim 32 of hidden 64 / 4 heads) model equals transformers' own parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron.training.checkpoint_convert.decoder_configs import megatron_flags_from_hf
    from tests.tools.checkpoint.test_conversion import FAMILIES

    config = dict(FAMILIES[family])
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    flags = megatron_flags_from_hf(config) + ["--lr", "1e-4", "--train-iters", "1", "--mock-data",
                                              "--micro-batch-size", "1", "--make-vocab-size-divisible-by", "128"]
    plan = plan_from_argv(flags + ["--world-size", "2", "--tensor-model-parallel-size", "2"])
    assert plan.parameters == sum(p.numel() for p in hf.parameters())  # tied embeddings counted once
