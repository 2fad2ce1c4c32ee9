"""Adapters trained by the driver at TP=2 x PP=2, exported, and loaded by peft.

One 4-process launch trains each configuration for two steps from an HF base
converted to our format (LoRA / RSLoRA / DoRA, targets {q, v} and all seven,
tied and untied embeddings) and computes the project's own logits from each
adapter checkpoint. Then, per configuration:
- `--saver peft` -> `peft.PeftModel.from_pretrained(hf_base, adapter_dir)`
  gives our logits, with no missing or unexpected key;
- `--saver hf` (merged in fp32) equals peft's `merge_and_unload()` and gives
  our logits too.
Three configurations cover every method, both target sets and both kinds of
embeddings: LoRA {q, v} untied, RSLoRA all-linear tied, DoRA all-linear untied.
"""

import os
import sys
import warnings

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.tools.checkpoint.peft_adapters import (
    HF_MODELS, convert, load_hf, make_hf_model, safetensors, to_megatron_base,
)

# fp32 on CPU; our model runs TP=2 x PP=2 (split matmuls, all-reduces) against
# transformers + peft in one process: the layouts differ only in the order of
# reductions (~1e-6 here). 1e-4 is the bound; an adapter missing from
# one module or a wrong scale moves the logits by > 1e-2 (asserted below).
LOGITS_ATOL = 1e-4
# Both merges are fp32 with the same formula: only matmul blocking can differ.
MERGE_ATOL = 1e-6

CONFIGS = {  # name: (base, --lora-* flags)
    "lora_qv_untied": ("untied", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj", "v_proj"]),
    "rslora_all_tied": ("tied", ["--lora-rank", "8", "--lora-alpha", "4", "--lora-target-modules", "all-linear",
                                 "--lora-use-rslora"]),
    "dora_all_untied": ("untied", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all-linear",
                                   "--lora-use-dora"]),
}
VOCAB = HF_MODELS["untied"]["vocab_size"]
TRAIN = ["--use-checkpoint-args", "--finetune", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
         "2", "--transformer-impl", "local", "--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by",
         "8", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
         "--lr", "1e-2", "--lr-decay-style", "constant", "--weight-decay", "0", "--lora-dropout", "0.1",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--eval-iters", "0", "--log-interval", "1"]


def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _train_and_score(rank, world_size, jobs):
    """Train each (base, flags, save) at TP=2 x PP=2; then our logits of each
    saved adapter checkpoint, under the same layout."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training import inference

    for base, flags, save in jobs:  # one process group for all runs: only the parallel layout is reset
        pretrain_gpt.main(TRAIN + ["--load", base, "--save", save] + flags)
        inference.unload()
    logits = {}
    for _, _, path in jobs:
        args, model = inference.load_model(path, 2, 2)
        logits[path] = inference.forward_logits(args, model, tokens())[..., :VOCAB]
        del model
        inference.unload()
    return logits if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{config: (hf base dir, adapter checkpoint, our logits)}."""
    root = tmp_path_factory.mktemp("adapters")
    hf = {name: make_hf_model(root / f"hf_{name}", seed=i, **cfg) for i, (name, cfg) in enumerate(HF_MODELS.items())}
    bases = {name: to_megatron_base(path, root / f"base_{name}") for name, path in hf.items()}
    jobs = [(bases[base], flags, str(root / name)) for name, (base, flags) in CONFIGS.items()]
    logits = run_distributed(_train_and_score, world_size=4, args=(jobs,), timeout=600)[0]
    return {name: (hf[base], str(root / name), logits[str(root / name)]) for name, (base, _) in CONFIGS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_loads_the_exported_adapter_and_merged_export_matches(trained, name, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    hf_base, checkpoint, ours = trained[name]
    with torch.no_grad():
        base_logits = load_hf(hf_base)(tokens()).logits
    assert (ours - base_logits).abs().max() > 100 * LOGITS_ATOL, "two steps should move the logits visibly"

    adapter = tmp_path / "adapter"
    assert convert("megatron", "peft", checkpoint, adapter, "--base-model-name-or-path", hf_base) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_hf(hf_base), str(adapter)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)], [str(w.message) for w in caught]
    written = safetensors(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(written)  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    with torch.no_grad():
        theirs = model(tokens()).logits
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: PeftModel vs ours {diff:.2e}, moved by {(ours - base_logits).abs().max():.2e}")
    assert diff <= LOGITS_ATOL, f"{name}: PeftModel vs our TP2xPP2 logits differ by {diff}"

    merged = tmp_path / "merged"
    assert convert("megatron", "hf", checkpoint, merged) == 0
    reference = model.merge_and_unload().state_dict()
    got = safetensors(merged / "model.safetensors")
    assert set(got) <= set(reference)  # tied: lm_head is the embedding, written once
    worst = max((got[k] - reference[k]).abs().max().item() for k in got)
    assert worst <= MERGE_ATOL, f"{name}: merged export vs merge_and_unload() differ by {worst}"
    with torch.no_grad():
        merged_diff = (load_hf(merged)(tokens()).logits - ours).abs().max().item()
    print(f"{name}: merged vs merge_and_unload {worst:.2e}, merged logits vs ours {merged_diff:.2e}")
    assert merged_diff <= LOGITS_ATOL
