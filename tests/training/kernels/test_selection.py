"""Which provider runs each kernel, from the flags and the machine's capabilities
(capabilities given here, so the GPU and Transformer Engine cases are checked on a CPU)."""

import dataclasses

import pytest

from megatron.training.arguments import ArgumentError, parse_args, transformer_config_from_args, validate_args
from megatron.training.kernels.capabilities import Capabilities
from megatron.training.kernels.selection import OFF, select

LLAMA = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "1", "--mock-data", "--vocab-size", "128",
         "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear"]

CPU = Capabilities(cuda=False, cpu_kernels=False, triton_interpreter=False, triton=True, liger=True,
                   transformer_engine=False, te_cross_entropy=False, apex=False, apex_wgrad=False,
                   masked_softmax_ext=False, torch_version=(2, 13))
CUDA = dataclasses.replace(CPU, cuda=True)
CUDA_TE = dataclasses.replace(CUDA, transformer_engine=True, te_cross_entropy=True)


def args_for(*flags, bf16=True):
    args = parse_args(LLAMA + (["--bf16"] if bf16 else []) + list(flags))
    validate_args(args, 1)
    return args


def choices(caps, *flags, bf16=True):
    return select(args_for(*flags, bf16=bf16), caps).choices


def test_cuda_without_transformer_engine_runs_every_kernel_of_this_package():
    assert choices(CUDA) == {
        "rope": "triton", "swiglu": "liger", "rmsnorm": OFF, "cross_entropy": "liger", "grad_accum": "addmm",
        "adam": "torch", "grad_clip": "foreach", "masked_softmax": OFF, "bias_dropout": "jit", "persist_layer_norm": OFF}


def test_transformer_engine_keeps_its_own_kernels_and_megatron_cores_fusions():
    got = choices(CUDA_TE, "--transformer-impl", "local")
    assert got["rope"] == "te" and got["swiglu"] == "jit" and got["cross_entropy"] == "te"
    assert got["adam"] == "te" and got["grad_clip"] == "te"
    assert choices(dataclasses.replace(CUDA, apex=True), "--no-foreach-grad-clip")["grad_clip"] == "apex"


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_gradient_accumulation_gate_does_not_count_transformer_engine_as_a_provider(impl):
    # megatron-core's own linear layers (all of them under the local spec, the
    # output layer under TE's) call apex's extension: with TE but no apex the
    # old gate switched the fusion on and ColumnParallelLinear raised. The shim
    # serves them now, and apex's extension wins where it is installed.
    assert choices(CUDA_TE, "--transformer-impl", impl)["grad_accum"] == "addmm"
    assert choices(dataclasses.replace(CUDA_TE, apex_wgrad=True), "--transformer-impl", impl)["grad_accum"] == "apex"
    old_torch = dataclasses.replace(CUDA_TE, torch_version=(2, 7))
    assert choices(old_torch, "--transformer-impl", impl)["grad_accum"] == OFF  # bf16 needs addmm's out_dtype


def test_a_cpu_runs_the_plain_torch_paths_and_the_triton_ones_only_when_told_it_is_a_kernel_device():
    assert choices(CPU, bf16=False) == {
        "rope": "torch", "swiglu": "torch", "rmsnorm": "torch", "cross_entropy": OFF, "grad_accum": "addmm",
        "adam": "torch", "grad_clip": "foreach", "masked_softmax": OFF, "bias_dropout": OFF, "persist_layer_norm": OFF}
    # bf16 weights into fp32 main grads need addmm's out_dtype, which the CPU lacks.
    assert choices(CPU)["grad_accum"] == OFF
    cpu_kernels = dataclasses.replace(CPU, cpu_kernels=True, triton_interpreter=True)
    got = choices(cpu_kernels, bf16=False)
    assert (got["rope"], got["swiglu"], got["cross_entropy"], got["grad_accum"], got["adam"], got["rmsnorm"]) == (
        "triton", "liger", "liger", "addmm", "torch", "torch")
    with pytest.raises(ArgumentError, match="also set TRITON_INTERPRET=1 before Python starts"):
        choices(dataclasses.replace(CPU, cpu_kernels=True), bf16=False)


@pytest.mark.parametrize("flag, kernel", [
    ("--no-rope-fusion", "rope"), ("--no-bias-swiglu-fusion", "swiglu"),
    ("--no-cross-entropy-loss-fusion", "cross_entropy"), ("--no-gradient-accumulation-fusion", "grad_accum"),
    ("--no-fused-adam", "adam"), ("--no-bias-dropout-fusion", "bias_dropout"), ("--no-foreach-grad-clip", "grad_clip")])
def test_each_off_flag_turns_exactly_its_kernel_off(flag, kernel):
    on, off = choices(CUDA), choices(CUDA, flag)
    assert off[kernel] == OFF and on[kernel] != OFF
    assert {k: v for k, v in off.items() if k != kernel} == {k: v for k, v in on.items() if k != kernel}


def test_cross_entropy_implementation_flag_keeps_megatron_lm_semantics():
    assert choices(CUDA, "--cross-entropy-fusion-impl", "native")["cross_entropy"] == "native"
    # megatron-core's fused path hands back bf16 gradients: never the default for fp32 weights...
    assert choices(dataclasses.replace(CUDA, liger=False), bf16=False)["cross_entropy"] == OFF
    # ...but asked for by name, it runs, as in Megatron-LM.
    assert choices(CUDA, "--cross-entropy-fusion-impl", "native", bf16=False)["cross_entropy"] == "native"
    with pytest.raises(ArgumentError, match="--cross-entropy-fusion-impl te cannot run here .*Transformer Engine"):
        choices(CUDA, "--cross-entropy-fusion-impl", "te")
    with pytest.raises(ArgumentError, match="--cross-entropy-loss-fusion needs CUDA"):
        choices(CPU, "--cross-entropy-loss-fusion")


def test_optimizer_fusion_of_transformer_engine_is_megatron_cores_choice():
    assert choices(CUDA_TE, "--no-fused-adam")["adam"] == "te"
    assert "adam" not in choices(CUDA, "--optimizer", "sgd")


def test_cpu_rmsnorm_has_its_off_flag_and_is_absent_where_the_local_norm_is_not_built():
    assert choices(CPU, "--no-rmsnorm-fusion", bf16=False)["rmsnorm"] == OFF
    assert {k: v for k, v in choices(CPU, "--no-rmsnorm-fusion", bf16=False).items() if k != "rmsnorm"} == {
        k: v for k, v in choices(CPU, bf16=False).items() if k != "rmsnorm"}
    assert "rmsnorm" not in choices(CUDA_TE, "--transformer-impl", "transformer_engine")  # TE's spec: TE's norms
    layer_norm = parse_args([("LayerNorm" if a == "RMSNorm" else a) for a in LLAMA])
    assert "rmsnorm" not in select(layer_norm, CPU).choices
    line = select(args_for("--no-rmsnorm-fusion", bf16=False), CPU).describe()
    assert "RMSNorm: torch.nn.RMSNorm" in line and "RMSNorm: torch, ours" in select(args_for(bf16=False), CPU).describe()


def test_models_without_the_operation_do_not_list_its_kernel():
    learned = parse_args([a for a in LLAMA if a != "--use-rotary-position-embeddings"] + ["--bf16"])
    assert "rope" not in select(learned, CUDA).choices
    gelu = parse_args([a for a in LLAMA if a != "--swiglu"] + ["--bf16"])
    assert "swiglu" not in select(gelu, CUDA).choices and select(gelu, CUDA).choices["gelu"] == "jit"


def test_start_up_line_and_transformer_config_follow_the_selection():
    selection = select(args_for(), CUDA)
    line = selection.describe()
    assert line.startswith("RoPE: Triton, ours; SwiGLU: Liger gate-up, Triton; RMSNorm: torch.nn.RMSNorm; "
                           "cross-entropy: Liger vocab-parallel, Triton; "
                           "gradient-accumulation fusion: torch.addmm(out_dtype=fp32) shim; AdamW: torch fused")
    fields = selection.transformer_config_fields(swiglu=True)
    assert fields["apply_rope_fusion"] and fields["bias_activation_fusion"] and fields["cross_entropy_loss_fusion"]
    assert fields["gradient_accumulation_fusion"] and fields["cross_entropy_fusion_impl"] == "native"
    assert select(args_for("--no-cross-entropy-loss-fusion"), CUDA_TE).transformer_config_fields(True)[
        "cross_entropy_loss_fusion"] is False


def test_the_driver_config_on_this_machine_runs_the_plain_torch_paths():
    args = args_for(bf16=False)
    config = transformer_config_from_args(args)
    assert config.apply_rope_fusion and config.gradient_accumulation_fusion and config.bias_activation_fusion
    assert not config.cross_entropy_loss_fusion
    assert {k for k, v in args.kernel_selection.choices.items() if v != OFF} == {
        "rope", "swiglu", "rmsnorm", "grad_accum", "adam", "grad_clip"}
    off = args_for("--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-gradient-accumulation-fusion",
                   "--no-fused-adam", "--no-foreach-grad-clip", "--no-rmsnorm-fusion", bf16=False)
    transformer_config_from_args(off)
    assert set(off.kernel_selection.choices.values()) == {OFF}
