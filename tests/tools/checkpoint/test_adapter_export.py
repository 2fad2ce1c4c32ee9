"""Adapters trained by the driver at TP=2 x PP=2, exported, and loaded by peft;
and a peft adapter imported to continue training.

One 4-process launch trains each configuration for two steps (LoRA / RSLoRA /
DoRA, targets {q, v} and all seven, tied and untied embeddings, and QLoRA
4-bit) from an HF base converted to our format, and one more from a peft
adapter imported with `--loader peft`; then computes the project's own logits
of each checkpoint. Per configuration:
- `--saver peft` -> `peft.PeftModel.from_pretrained(hf_base, adapter_dir)`
  (the base loaded 4-bit by transformers + bitsandbytes for QLoRA) gives our
  logits, with no missing or unexpected key;
- `--saver hf` (merged in fp32) equals peft's `merge_and_unload()` and gives
  our logits too (QLoRA: merged into the dequantized base it trained on).
"""

import os
import sys
import warnings

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.tools.checkpoint.peft_adapters import (
    HF_MODELS, convert, load_hf, make_hf_model, make_peft_adapter, safetensors, to_megatron_base,
)

# fp32 on CPU; our model runs TP=2 x PP=2 (split matmuls, all-reduces) against
# transformers + peft in one process: the layouts differ only in the order of
# reductions (~1e-6 here). 1e-4 is the bound; an adapter missing from
# one module or a wrong scale moves the logits by > 1e-2 (asserted below).
LOGITS_ATOL = 1e-4
# Both merges are fp32 with the same formula: only matmul blocking can differ.
MERGE_ATOL = 1e-6

CONFIGS = {  # name: (what it starts from, --lora-* flags)
    "lora_qv_untied": ("untied", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj", "v_proj"]),
    "rslora_all_tied": ("tied", ["--lora-rank", "8", "--lora-alpha", "4", "--lora-target-modules", "all-linear",
                                 "--lora-use-rslora"]),
    "dora_all_untied": ("untied", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all-linear",
                                   "--lora-use-dora"]),
    "qlora4_qv_untied": ("wide", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj",
                                  "v_proj", "--lora-quant-bits", "4"]),
    # continue training an adapter peft saved (IMPORTED below): the flags must be its settings
    "continued_from_peft": ("imported", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj",
                                         "k_proj", "o_proj", "down_proj", "--lora-use-dora", "--lora-use-rslora"]),
}
IMPORTED = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_dora=True,
                use_rslora=True)
VOCAB = HF_MODELS["untied"]["vocab_size"]
TRAIN = ["--use-checkpoint-args", "--finetune", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
         "2", "--transformer-impl", "local", "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by",
         "8", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
         "--lr", "1e-2", "--lr-decay-style", "constant", "--weight-decay", "0", "--lora-dropout", "0.1",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--eval-iters", "0", "--log-interval", "1"]


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _train_and_score(rank, world_size, jobs, scored):
    """Train each (load, flags, save) at TP=2 x PP=2; then our logits of each
    saved adapter checkpoint and of each checkpoint in `scored`, under the same layout."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training import inference

    for load, flags, save in jobs:  # one process group for all runs: only the parallel layout is reset
        pretrain_gpt.main(TRAIN + ["--load", load, "--save", save] + flags)
        inference.unload()
    logits = {}
    for path in [save for _, _, save in jobs] + list(scored):
        args, model = inference.load_model(path, 2, 2)
        logits[path] = inference.forward_logits(args, model, tokens())[..., :VOCAB]
        del model
        inference.unload()
    return logits if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{config: (hf base dir, adapter checkpoint, our logits)}; "imported": (hf base, peft dir, our logits
    of the imported checkpoint)."""
    root = tmp_path_factory.mktemp("adapters")
    hf = {name: make_hf_model(root / f"hf_{name}", seed=i, **cfg) for i, (name, cfg) in enumerate(HF_MODELS.items())}
    loads = {name: to_megatron_base(path, root / f"base_{name}") for name, path in hf.items()}
    hf["imported"] = hf["untied"]
    make_peft_adapter(hf["imported"], root / "peft_adapter", seed=5, **IMPORTED)
    loads["imported"] = str(root / "imported")
    assert convert("peft", "megatron", root / "peft_adapter", loads["imported"], "--base-load-dir", loads["untied"],
                   "--target-tensor-parallel-size", 2) == 0
    jobs = [(loads[start], flags, str(root / name)) for name, (start, flags) in CONFIGS.items()]
    logits = run_distributed(_train_and_score, world_size=4, args=(jobs, [loads["imported"]]), timeout=600)[0]
    out = {name: (hf[start], str(root / name), logits[str(root / name)]) for name, (start, _) in CONFIGS.items()}
    out["imported"] = (hf["imported"], str(root / "peft_adapter"), logits[loads["imported"]])
    return out


def load_hf_as_trained(path, name):
    """The HF base as the configuration trained on it: 4-bit NF4 (block 64, fp32 compute) for QLoRA."""
    if "qlora4" not in name:
        return load_hf(path)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import bitsandbytes

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, quantization_config=config).eval()
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            # bitsandbytes' CPU inference fast path repacks the weight with bf16 scales (not the NF4 values
            # training used, and only for >= 64 input features): use its exact dequantizing path
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.slow
def test_imported_peft_adapter_gives_peft_s_logits(trained):
    """What `--loader peft --saver megatron` wrote (at TP=2), run by the driver at TP=2 x PP=2: peft's model."""
    from peft import PeftModel

    hf_base, adapter_dir, ours = trained["imported"]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load_hf(hf_base), adapter_dir).eval()(tokens()).logits
        base_logits = load_hf(hf_base)(tokens()).logits
    assert (theirs - base_logits).abs().max() > 100 * LOGITS_ATOL
    assert (theirs - ours).abs().max().item() <= LOGITS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_loads_the_exported_adapter_and_merged_export_matches(trained, name, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    hf_base, checkpoint, ours = trained[name]
    with torch.no_grad():
        start = trained["imported"][2] if CONFIGS[name][0] == "imported" else load_hf(hf_base)(tokens()).logits
    assert (ours - start).abs().max() > 100 * LOGITS_ATOL, "two steps should move the logits visibly"

    adapter = tmp_path / "adapter"
    assert convert("megatron", "peft", checkpoint, adapter, "--base-model-name-or-path", hf_base) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_hf_as_trained(hf_base, name), str(adapter)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)], [str(w.message) for w in caught]
    written = safetensors(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(written)  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    with torch.no_grad():
        theirs = model(tokens()).logits
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: PeftModel vs ours {diff:.2e}, moved by {(ours - start).abs().max():.2e}")
    assert diff <= LOGITS_ATOL, f"{name}: PeftModel vs our TP2xPP2 logits differ by {diff}"

    merged = tmp_path / "merged"
    assert convert("megatron", "hf", checkpoint, merged) == 0
    got = safetensors(merged / "model.safetensors")
    if "qlora4" not in name:  # (peft's merge keeps a 4-bit base 4-bit: no plain weights to compare)
        reference = model.merge_and_unload().state_dict()
        assert set(got) <= set(reference)  # tied: lm_head is the embedding, written once
        worst = max((got[k] - reference[k]).abs().max().item() for k in got)
        assert worst <= MERGE_ATOL, f"{name}: merged export vs merge_and_unload() differ by {worst}"
    with torch.no_grad():
        merged_diff = (load_hf(merged)(tokens()).logits - ours).abs().max().item()
    print(f"{name}: merged logits vs ours {merged_diff:.2e}")
    assert merged_diff <= LOGITS_ATOL
