"""The fine-tuning presets for Llama-3.1-8B/70B and Qwen2.5-7B/72B
(scripts/*_sft.sh, *_lora.sh), checked without GPUs: the printed
finetune_gpt.py command passes the driver's validation through the planner
on one node of 8 GPUs, fits an 80 GB A100 / H100, and describes the public
model exactly: the planner's parameter count equals transformers' own count
of the same architecture (built on the meta device, nothing downloaded), plus
the rows Megatron pads the vocabulary with at the script's TP."""

import pytest
import torch

from megatron.training.data.sft_dataset import add_sft_args
from megatron.training.planner.plan import GIB, plan_from_argv
from tests.scripts.test_launch_scripts import A100_GIB, HEADROOM_GIB, _cluster, _run


def _torchrun_finetune(text):
    import shlex

    words = shlex.split(text)
    at = next(i for i, w in enumerate(words) if w.endswith("finetune_gpt.py"))
    return dict(zip(words[1:at:2], words[2:at:2])), words[at + 1:]


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=False,
                                         rope_theta=500000.0, **kw)


def _qwen(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0, **kw)


# script -> (the model's public config.json, the family's flags, whether it trains adapters)
PRESETS = {
    "llama3.1_8B_sft.sh": (lambda: _llama(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32), ["--use-rope-scaling", "--rotary-base"], False),
    "llama3.1_70B_lora.sh": (lambda: _llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                            num_attention_heads=64), ["--use-rope-scaling", "--rotary-base"], True),
    "qwen2.5_7B_sft.sh": (lambda: _qwen(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                        num_attention_heads=28, num_key_value_heads=4), ["--add-qkv-bias"], False),
    "qwen2.5_72B_lora.sh": (lambda: _qwen(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                          num_attention_heads=64, num_key_value_heads=8), ["--add-qkv-bias"], True),
}
# published parameter counts (the model cards' 8.03B, 70.6B, 7.61B, 72.7B), as transformers counts them here
HF_PARAMETERS = {"llama3.1_8B_sft.sh": 8_030_261_248, "llama3.1_70B_lora.sh": 70_553_706_496,
                 "qwen2.5_7B_sft.sh": 7_615_616_512, "qwen2.5_72B_lora.sh": 72_706_203_648}


@pytest.mark.parametrize("script", sorted(PRESETS))
def test_preset_is_the_public_model_and_fits_one_node(script):
    make, family_flags, adapters = PRESETS[script]
    out = _run(["bash", f"scripts/{script}"], _cluster(1, DRY_RUN=1, TOKENIZER_MODEL="/models/hf-dir"))
    assert out.returncode == 0, out.stderr
    options, flags = _torchrun_finetune(out.stdout)
    assert (options["--nnodes"], options["--nproc_per_node"]) == ("1", "8")
    assert all(f in flags for f in family_flags + ["--use-checkpoint-args", "--finetune", "--sft-packing"])
    assert flags[flags.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"
    assert ("--lora-rank" in flags) == adapters

    model_class, config = make()
    with torch.device("meta"):
        expected = sum(p.numel() for p in model_class(config).parameters())
    assert expected == HF_PARAMETERS[script]
    for gpu in ("A100", "H100"):
        plan = plan_from_argv(flags + ["--world-size", "8", "--vocab-size", str(config.vocab_size), "--gpu", gpu],
                              add_sft_args)
        padding_rows = plan.args.padded_vocab_size - config.vocab_size
        assert plan.parameters == expected + 2 * padding_rows * config.hidden_size  # untied: input and output
        peak = plan.peak_stage.total / GIB
        assert peak <= A100_GIB - HEADROOM_GIB, f"{script} on {gpu}: {peak:.1f} GiB"
        assert (plan.peak_stage.trainable < plan.peak_stage.parameters / 50) == adapters


def test_plan_mode_of_a_preset_prints_the_plan():
    out = _run(["bash", "scripts/qwen2.5_7B_sft.sh"], _cluster(1, PLAN=1, PLAN_ARGS="--gpu H100"))
    assert out.returncode == 0, out.stderr
    assert "7.62B parameters" in out.stdout and "vocab 152064 padded" in out.stdout
    assert "world size 8 = TP 2 x PP 1 x DP 4" in out.stdout and "per H100" in out.stdout and "fits: peak" in out.stdout

