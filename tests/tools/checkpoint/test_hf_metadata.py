"""--saver hf --hf-base-dir (checkpoint_convert/hf_metadata.py): the export's
config.json is the base's, changed only in the fields the exported model
requires, each in the base's own form; another model's directory is refused.
(The files written end to end, byte for byte: tests/sft/test_finetune_families.py,
test_sft_learns.py, test_lora_learns.py.)"""

import pytest
import torch

from megatron.training.checkpoint_convert.core import ConversionError
from megatron.training.checkpoint_convert.decoder_configs import hf_config_from_megatron, megatron_args_from_hf
from megatron.training.checkpoint_convert.hf_metadata import config_from_base

# SmolLM2-135M's config.json as transformers 5 writes it (the model), and a transformers-4 form of it.
SMOL = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "dtype": "float32", "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
        "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": False, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "transformers_version": "5.25.0",
        "unk_token_id": 0, "use_cache": True, "vocab_size": 49152}
SMOL_V4 = dict({k: v for k, v in SMOL.items() if k not in ("rope_parameters", "dtype")}, rope_theta=100000.0,
               rope_scaling=None, torch_dtype="float32")


def export(base, dtype=torch.float32, **changed):
    """(config.json, changes) of the export of a checkpoint converted from `base` with settings `changed`."""
    args = dict(megatron_args_from_hf(base), **changed)
    written = hf_config_from_megatron(args, base["vocab_size"], dtype, {"bos_token_id": 0, "eos_token_id": 0})
    return config_from_base(base, written, args, "BASE")


@pytest.mark.parametrize("base", [SMOL, SMOL_V4], ids=["transformers5", "transformers4"])
def test_only_the_fields_the_model_changes(base):
    assert export(base) == (base, [])  # pad_token_id, unk_token_id, use_cache, rope form: all the base's

    config, changes = export(base, torch.bfloat16)
    dtype_key = "dtype" if "dtype" in base else "torch_dtype"
    assert config == dict(base, **{dtype_key: "bfloat16"}) and changes == [f"{dtype_key} 'float32' -> 'bfloat16'"]

    # position interpolation added by a run (--rotary-seq-len-interpolation-factor 4), written in the base's form
    config, _ = export(base, rotary_seq_len_interpolation_factor=4.0, max_position_embeddings=32768)
    rope = {"rope_type": "linear", "factor": 4.0}
    if "rope_parameters" in base:
        assert config == dict(base, rope_parameters=dict(rope, rope_theta=100000.0), max_position_embeddings=32768)
    else:
        assert config == dict(base, rope_scaling=rope, max_position_embeddings=32768)
    from transformers import LlamaConfig

    loaded = LlamaConfig(**config)
    assert loaded.rope_parameters["rope_type"] == "linear" and loaded.rope_parameters["factor"] == 4.0


def test_llama3_rope_kept_in_its_form_and_another_model_refused():
    base = dict(SMOL, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    assert export(base) == (base, [])
    with pytest.raises(ConversionError, match=r"BASE is not this model's base: the checkpoint has num_layers 32 "
                                              r"\(its config.json: 30\)"):
        export(SMOL, num_layers=32)
    with pytest.raises(ConversionError, match="model_type qwen2"):
        export(SMOL, add_qkv_bias=True)
