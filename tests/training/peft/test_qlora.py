"""QLoRA's base equals what transformers + bitsandbytes load from the same
Hugging Face checkpoint, bit for bit, and gives that model's logits.

A tiny random HF Llama is converted to a Megatron checkpoint (TP=1) by
tools/checkpoint; the driver loads it as a QLoRA base at TP=2 (so each
matrix is quantised whole, then sliced: o_proj's 64-blocks are cut in half
between the two ranks) and at PP=2, for 4 and 8 bits. The reference is transformers'
LlamaForCausalLM.from_pretrained with BitsAndBytesConfig (load_in_4bit nf4
without double quantisation; load_in_8bit), which runs on CPU here. Every
in_features is a multiple of 64, where bitsandbytes' native CPU kernel
dequantises the format correctly (test_layers.py covers the other widths).
The logits are compared with an unquantised LlamaForCausalLM holding those
dequantised weights: bitsandbytes' own CPU inference kernel (AVX512-BF16
machines) computes the 4-bit matmul in bf16 (logits ~3e-3 away) and its 8-bit matmul quantises the
activations too, while QLoRA here multiplies by the dequantised weight.
"""

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.tools.checkpoint.test_conversion import make_hf_model, to_megatron

MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
# fp32: our model and transformers' compute the same logits from the same (dequantised)
# weights in a different order and layout (TP=2 here), which moves them by ~2e-7; the
# conversion tests' bound of 1e-4 is far below what one wrong block scale gives (>1e-2).
ATOL = 1e-4


def _qlora_worker(rank, world_size, base, bits_list):
    """{bits: (dequantised base as HF tensors, logits)} from the driver's QLoRA model at TP=2."""
    from megatron.core import parallel_state

    from megatron.training import inference, sharding
    from megatron.training.models.hf_names import LLAMA_LAYERS as LAYER_TABLE
    from megatron.training.peft.quantized import QuantizedLinear
    from megatron.training.peft.targets import LayerDims, split_to_hf

    out = {}
    for bits in bits_list:
        flags = ["--lora-rank", "4", "--lora-quant-bits", str(bits), "--transformer-impl", "local"]
        args, model = inference.load_model(base, 2, 1, extra_argv=flags)
        dims = LayerDims.from_config(model[0].config)
        hf_names = {mg[: -len(".weight")]: names for mg, names, _ in LAYER_TABLE}
        weights = {}
        for name, layer in model[0].named_modules():
            if not isinstance(layer, QuantizedLinear):
                continue
            shard = layer.dequantized_weight()
            pieces = [torch.empty_like(shard) for _ in range(2)]
            torch.distributed.all_gather(pieces, shard, group=parallel_state.get_tensor_model_parallel_group())
            full = sharding.merge_tp(pieces, *sharding.tp_partition(f"{layer.module_name}.weight", True))
            index = name.split(".")[2]
            for hf_name, part in zip(hf_names[layer.module_name], split_to_hf(layer.module_name, full, dims)):
                weights[f"model.layers.{index}.{hf_name}"] = part
        out[bits] = (weights, inference.forward_logits(args, model, TOKENS))
        del model
        inference.unload()
        # The same base at PP=2: every stage quantises its own layers from the full tensors.
        args, model = inference.load_model(base, 1, 2, extra_argv=flags)
        out[f"{bits}_pp2"] = inference.forward_logits(args, model, TOKENS)
        del model
        inference.unload()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def hf_and_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    hf_dir = make_hf_model(root / "hf", seed=3, **MODEL)
    return hf_dir, to_megatron(hf_dir, root / "megatron")


@pytest.fixture(scope="module")
def ours(hf_and_base):
    return run_distributed(_qlora_worker, world_size=2, args=(hf_and_base[1], (4, 8)))[0]


def _transformers_model(hf_dir, bits):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                    bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return LlamaForCausalLM.from_pretrained(hf_dir, quantization_config=config, dtype=torch.float32,
                                            device_map="cpu").eval()


def _dequantized(linear, bits):
    import bitsandbytes as bnb

    if bits == 4:
        return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    return bnb.functional.int8_vectorwise_dequant(linear.weight.data, linear.weight.SCB)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_base_equals_transformers_bitsandbytes_bit_for_bit(bits, hf_and_base, ours):
    reference = _transformers_model(hf_and_base[0], bits)
    weights, _ = ours[bits]
    assert len(weights) == MODEL["num_hidden_layers"] * 7
    for name, tensor in weights.items():
        linear = reference.get_submodule(name[: -len(".weight")])
        assert type(linear).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt"), name
        assert torch.equal(tensor, _dequantized(linear, bits)), f"{bits}-bit {name} differs from bitsandbytes'"


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_logits_equal_an_unquantised_model_of_the_dequantised_weights(bits, hf_and_base, ours):
    from transformers import LlamaForCausalLM

    weights, logits = ours[bits]
    reference = LlamaForCausalLM.from_pretrained(hf_and_base[0], dtype=torch.float32).eval()
    original = {n: p.clone() for n, p in reference.named_parameters()}
    reference.load_state_dict(weights, strict=False)
    with torch.no_grad():
        want = reference(TOKENS).logits
    torch.testing.assert_close(logits[..., :MODEL["vocab_size"]], want, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours[f"{bits}_pp2"], logits, rtol=0, atol=ATOL)
    # The quantisation is real: the full-precision model's logits are further away.
    reference.load_state_dict(original)
    with torch.no_grad():
        full_precision = reference(TOKENS).logits
    assert (full_precision - want).abs().max() > 10 * ATOL
