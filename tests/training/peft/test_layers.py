"""Each adapter method on megatron-core's linears equals peft's own layer.

One process builds the driver's GPTModel with `apply_adapters` (the hook the
driver uses) and, for every adapted linear of layer 0, builds the independent
reference: peft 0.21.2's LoRA layers (`inject_adapter_in_model`) around plain
`nn.Linear`s holding the same HF weights (q/k/v and gate/up cut out of the
fused megatron-core tensor by the converter's tables), with the same adapter
weights (B and the DoRA magnitudes set to random values so every gradient is
non-zero). Outputs, input gradients and A / B / magnitude gradients are
compared. With dropout both sides draw their masks from the same seeded
generator in the same order (batch 1, so [s, 1, h] and [1, s, h] masks are
the same draws), so dropout paths are compared too, DoRA's included.

QLoRA's base: the quantised layers' weights equal bitsandbytes' own
quantise/dequantise round trip bit for bit (NF4 with hidden 48: the 64-blocks
straddle rows, so the per-piece scales are exercised; int8 row-wise), and the
adapted quantised layer equals peft's layer over those dequantised weights.
tests/training/peft/test_qlora.py compares with transformers + bitsandbytes.
"""

import copy

import bitsandbytes  # noqa: F401 (imported once here: the forked test process inherits it)
import peft  # noqa: F401
import pytest
import torch

from tests.distributed.launcher import run_distributed

# hidden 48 (not a multiple of 64), 4 heads of 12 in 2 query groups, SwiGLU fc1 of 2 x 80 rows.
MODEL = ["--num-layers", "1", "--hidden-size", "48", "--ffn-hidden-size", "80", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "8", "--max-position-embeddings", "8",
         "--normalization", "RMSNorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--transformer-impl", "local",
         "--mock-data", "--vocab-size", "64", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1",
         "--lora-rank", "4", "--lora-alpha", "12", "--lora-target-modules", "all-linear",
         "--load", "unused-no-checkpoint-is-read"]
SEQ, RANK = 8, 4

# fp32 on CPU, errors relative to the largest entry of each compared tensor (at least 1).
# Both sides compute the same products in a different order (peft: one nn.Linear per HF
# module, its DoRA norm from B(A(I)).T; here: fused shards, B @ A), so they agree to a few
# ulp (observed < 4e-7); 1e-5 leaves headroom and still fails for any real difference (a
# wrong row, scale or missing term moves values by >1e-2 of the largest entry).
TOLERANCE = 1e-5

CASES = {
    "lora": dict(),
    "rslora": dict(lora_use_rslora=True),
    "dora": dict(lora_use_dora=True),
    "lora_dropout": dict(lora_dropout=0.3),
    "dora_dropout": dict(lora_use_dora=True, lora_dropout=0.3),
    "qlora4_dora": dict(lora_quant_bits=4, lora_use_dora=True),
    "qlora8": dict(lora_quant_bits=8),
}


def _hf_container(parts, weights):
    from torch import nn

    container = nn.Module()
    for name, w in zip(parts, weights):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        setattr(container, name, linear)
    return container


def _bnb_dequantized(weights, bits):
    """bitsandbytes' own round trip of each HF weight. 4 bits: quantize_4bit, then its portable
    dequantisation kernel (the flat-64-block format of its CUDA kernel; the native CPU kernel of
    bitsandbytes 0.50.2 indexes blocks per row and disagrees with quantize_4bit when in_features is
    not a multiple of 64, as here). 8 bits: Int8Params' recipe (fp16, int8_vectorwise_quant), then
    int8_vectorwise_dequant."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    out = []
    for w in weights:
        if bits == 4:
            packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            out.append(_dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, w.shape,
                                                torch.float32))
        else:
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
            out.append(bnb.functional.int8_vectorwise_dequant(codes, scales))
    return out


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| over the largest |reference| entry (at least 1)."""
    return ((ours - reference).abs().max() / reference.abs().max().clamp(min=1.0)).item()


def _compare_module(args, module, suffix, dims, generator):
    """Max |ours - peft| of output, input grad and each adapter grad for one adapted linear."""
    from peft import LoraConfig, inject_adapter_in_model

    from megatron.training.peft.layers import base_weight
    from megatron.training.peft.targets import hf_parts, join_from_hf, split_to_hf

    parts = hf_parts(suffix, dims)
    if args.lora_quant_bits:
        full = torch.randn(module.out_local, module.in_local, generator=generator) * 0.1
        module.load_full_weight(full, dims)
    hf_weights = split_to_hf(suffix, base_weight(module), dims)
    result = {}
    if args.lora_quant_bits:
        expected_weights = _bnb_dequantized(split_to_hf(suffix, full, dims), args.lora_quant_bits)
        result["dequantized_bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(hf_weights, expected_weights))
    # peft's LoRA layers over nn.Linear with the (dequantised) base weights: for QLoRA this is what
    # peft's bnb layers compute in training (dequantise, then matmul), minus int8 activation quantisation.
    reference = _hf_container(parts, hf_weights)
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(parts), use_dora=args.lora_use_dora, use_rslora=args.lora_use_rslora)
    reference = inject_adapter_in_model(config, reference)
    adapter = module.adapter
    with torch.no_grad():
        for name in parts:
            ours, theirs = adapter.sub(name), getattr(reference, name)
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            ours.lora_B.weight.copy_(torch.randn(ours.lora_B.weight.shape, generator=generator) * 0.2)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
            if args.lora_use_dora:
                magnitude = theirs.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.2 * torch.rand(magnitude.shape, generator=generator))
                ours.lora_magnitude_vector.copy_(magnitude)
    in_features = dims.hf_shape(parts[0])[1]
    x = torch.randn(SEQ, 1, in_features, generator=generator)
    x_ours, x_hf = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    module.train()
    reference.train()
    torch.manual_seed(99)
    out, _ = module(x_ours)
    torch.manual_seed(99)
    outs = [getattr(reference, n)(x_hf)[0] for n in parts]  # [seq, rows] each
    expected = join_from_hf(suffix, [o.t() for o in outs], dims.groups).t().unsqueeze(1)
    weights = torch.randn(out.shape, generator=generator)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    result["output"] = _relative(out, expected)
    result["output_scale"] = expected.abs().max().item()
    result["input_grad"] = _relative(x_ours.grad, x_hf.grad.transpose(0, 1))
    for name in parts:
        ours, theirs = adapter.sub(name), getattr(reference, name)
        pairs = {"lora_A": (ours.lora_A.weight, theirs.lora_A["default"].weight),
                 "lora_B": (ours.lora_B.weight, theirs.lora_B["default"].weight)}
        if args.lora_use_dora:
            pairs["magnitude"] = (ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
        for what, (a, b) in pairs.items():
            result[f"{name}.{what}.grad"] = _relative(a.grad, b.grad)
            result[f"{name}.{what}.grad_nonzero"] = bool(b.grad.abs().max() > 0)
    return result


def _compare_all(rank, world_size):
    from megatron.training import arguments, initialize, training
    from megatron.training.models.llama import build_gpt_model
    from megatron.training.peft.model import apply_adapters
    from megatron.training.peft.targets import MODULES, LayerDims

    base_args = training.setup_args(MODEL)
    training.build_tokenizer_from_args(base_args)  # sets padded_vocab_size
    out = {}
    for case, settings in CASES.items():
        args = copy.copy(base_args)
        for key, value in settings.items():
            setattr(args, key, value)
        config = arguments.transformer_config_from_args(args)
        model = build_gpt_model(args, config)
        apply_adapters(args, config, [model])
        dims = LayerDims.from_config(config)
        generator = torch.Generator().manual_seed(5)
        for suffix in MODULES:
            module = model.decoder.layers[0].get_submodule(suffix)
            for key, value in _compare_module(args, module, suffix, dims, generator).items():
                out[(case, suffix, key)] = value
    out["saved"] = _saved_by_frozen_bases(base_args)
    initialize.destroy()
    return out


def _saved_by_frozen_bases(base_args):
    """What autograd keeps for backward from a frozen linear without adapter and
    from a 4-bit QLoRA base: [(numel, is the weight parameter)] per layer."""
    from megatron.training import arguments
    from megatron.training.models.llama import build_gpt_model
    from megatron.training.peft.model import apply_adapters
    from megatron.training.peft.targets import LayerDims

    saved = {}
    for bits in (None, 4):
        args = copy.copy(base_args)
        args.lora_quant_bits, args.lora_target_modules = bits, ["q_proj"]
        config = arguments.transformer_config_from_args(args)
        model = build_gpt_model(args, config)
        apply_adapters(args, config, [model])
        fc1 = model.decoder.layers[0].mlp.linear_fc1  # no adapter on it: only q_proj is targeted
        if bits:
            fc1.load_full_weight(torch.randn(fc1.out_local, fc1.in_local), LayerDims.from_config(config))
        weight = getattr(fc1, "weight", None)
        records = []

        def pack(t):
            records.append((t.numel(), weight is not None and t.data_ptr() == weight.data_ptr()))
            return t

        x = torch.randn(SEQ, 1, args.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fc1(x)[0].sum().backward()
        saved[bits] = (records, x.grad.abs().max().item(), fc1.out_local * fc1.in_local if bits else weight.numel())
    return saved


@pytest.fixture(scope="module")
def comparisons():
    return run_distributed(_compare_all, world_size=1)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_layers_equal_peft(case, comparisons):
    from megatron.training.peft.targets import MODULES

    for suffix in MODULES:
        got = {k[2]: v for k, v in comparisons.items() if k[:2] == (case, suffix)}
        assert got["output_scale"] > 0.1, "the layer output should not be trivially small"
        assert got["output"] < TOLERANCE, f"{case} {suffix}: output differs from peft's by {got['output']}"
        assert got["input_grad"] < TOLERANCE, f"{case} {suffix}: input gradient differs by {got['input_grad']}"
        grads = {k: v for k, v in got.items() if k.endswith(".grad")}
        assert grads and all(v < TOLERANCE for v in grads.values()), f"{case} {suffix}: {grads}"
        assert all(got[k + "_nonzero"] for k in grads), f"{case} {suffix}: a reference gradient is zero"
        if "dequantized_bitwise_equal" in got:
            assert got["dequantized_bitwise_equal"], f"{case} {suffix}: the dequantised base differs from bitsandbytes'"


def test_frozen_bases_keep_no_activation_or_dequantised_weight_for_backward(comparisons):
    """A frozen megatron-core linear (LinearWithFrozenWeight) keeps only its weight parameter, no
    input; a QLoRA base keeps nothing (its weight is dequantised again in backward)."""
    records, input_grad, _ = comparisons["saved"][None]
    assert records and all(is_weight for _, is_weight in records) and input_grad > 0
    records, input_grad, weight_numel = comparisons["saved"][4]
    assert input_grad > 0
    assert not [n for n, _ in records if n >= weight_numel], f"a weight-sized tensor is kept: {records}"
