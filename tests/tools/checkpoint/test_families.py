"""Llama 3.x, Qwen2, Qwen3 and Mistral through every tool: tiny random models
of transformers' own classes (tests/tools/checkpoint/test_conversion.py
FAMILIES) converted, run, trained further, given adapters and exported.

One 4-process launch, for each family:
- the HF model converted at TP=2 x PP=2 gives transformers' logits within 1e-5
  on 2 x 512 tokens, where dropping what sets the family apart (Llama 3
  scaling, Qwen2's q/k/v biases, Qwen3's q/k norm) moves the logits by more than
  100 times that and the next-token loss visibly; Mistral's refused sliding
  window would too;
- the HF model converted to torch_dist (bitwise back to HF) continues training
  with --use-checkpoint-args at TP=2 x PP=2: the driver restores the family's
  settings from the checkpoint, trains, saves torch_dist, and that checkpoint
  exports to the family's own HF class with the driver's logits; for Qwen2 and
  Qwen3 the same SGD steps at DP=4 reach the same weights (q/k norm gradients
  summed over the TP ranks, q/k/v biases split with their rows);
- adapters trained at TP=2 x PP=2 (RSLoRA on Llama 3, 4-bit QLoRA with DoRA
  on every linear of Qwen2, whose biased linear_qkv keeps its bias frozen and
  unquantised, LoRA with Qwen3's norms, LoRA on Mistral) export to a peft
  directory that `PeftModel.from_pretrained` loads with no missing or
  unexpected key and the driver's logits within 1e-4, and the merged HF export
  gives the same logits within 1e-4.
"""

import json
import os
import sys
import warnings

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed
from tests.tools.checkpoint.test_adapter_export import load_hf_as_trained
from tests.tools.checkpoint.test_conversion import (
    FAMILIES, assert_same_tensors, convert, hf_logits, read_safetensors, to_megatron,
)

# fp32 on CPU: the converted model runs TP=2 x PP=2 against transformers in one process, which only
# reorders reductions; on sharp attention over 512 positions that stays ~1e-6.
LOGITS_ATOL = 1e-5
# transformers + peft against our adapters (and the fp32 merge): the existing adapter tests' bound.
ADAPTER_ATOL = 1e-4
LONG = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(3))
SHORT = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
RUN = LAYOUT + ["--use-checkpoint-args", "--finetune", "--mock-data", "--vocab-size", "256", "--seq-length", "64",
                "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-2",
                "--lr-decay-style", "constant", "--weight-decay", "0", "--eval-iters", "0", "--log-interval", "1"]
# Continued training by plain SGD, whose update is the gradient itself: the same run at TP=1 x PP=1 x DP=4
# (Qwen2, Qwen3) must reach the same weights, which a q/k norm gradient not summed over the TP ranks (each
# holds half the heads) or a q/k/v bias split the wrong way would not.
CONTINUE = RUN + ["--optimizer", "sgd", "--sgd-momentum", "0", "--lr", "0.1"]
DATA_PARALLEL = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--micro-batch-size", "1"]
PARITY = ("qwen2", "qwen3")
ADAPTERS = {  # name: (family, --lora-* flags)
    "llama3_rslora": ("llama3", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-use-rslora", "--lora-target-modules",
                                 "q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen2_qlora4_dora": ("qwen2", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-quant-bits", "4",
                                    "--lora-use-dora", "--lora-target-modules", "all-linear"]),
    "qwen3_lora": ("qwen3", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "all-linear"]),
    "mistral_lora": ("mistral", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj",
                                 "v_proj"]),
}
CLASSES = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM"}


def _steps_worker(rank, world_size, steps):
    """Run ("train", argv) and ("logits", checkpoint, tokens) steps in order in one process group at
    TP=2 x PP=2; the logits by step index (rank 0)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_gpt
    from megatron.training import inference

    out = {}
    for index, step in enumerate(steps):
        if step[0] == "train":
            pretrain_gpt.main(list(step[1]))
        else:
            args, model = inference.load_model(step[1], 2, 2)
            out[index] = inference.forward_logits(args, model, step[2])[..., :256]
            del model
        inference.unload()
    return out if rank == 0 else None


def next_token_loss(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                             tokens[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def runs(family_dirs, tmp_path_factory):
    """{family: paths and our logits}, from one 4-process launch."""
    root = tmp_path_factory.mktemp("family_runs")
    out, steps = {}, []
    for name, hf in family_dirs.items():
        paths = {"hf": hf, "torch": to_megatron(hf, root / f"{name}_tp2pp2", 2, 2),
                 "dist": convert("hf", "torch_dist", hf, root / f"{name}_dist", "--make-vocab-size-divisible-by", 64),
                 "continued": str(root / f"{name}_continued"), "continued_dp": str(root / f"{name}_continued_dp")}
        steps += [("logits", paths["torch"], LONG),
                  ("train", CONTINUE + ["--load", paths["dist"], "--save", paths["continued"]]),
                  ("logits", paths["continued"], SHORT)]
        out[name] = dict(paths, base_logits=len(steps) - 3, continued_logits=len(steps) - 1)
        if name in PARITY:
            steps.append(("train", CONTINUE + DATA_PARALLEL + ["--load", paths["dist"], "--save",
                                                               paths["continued_dp"]]))
    for name, (family, flags) in ADAPTERS.items():
        out[name] = {"family": family, "adapter": str(root / name)}
        steps += [("train", RUN + ["--load", out[family]["torch"], "--save", out[name]["adapter"],
                                   "--transformer-impl", "local"] + flags),
                  ("logits", out[name]["adapter"], SHORT)]
        out[name]["logits"] = len(steps) - 1
    logits = run_distributed(_steps_worker, world_size=4, args=(steps,), timeout=900)[0]
    for entry in out.values():
        for key in ("base_logits", "continued_logits", "logits"):
            if key in entry:
                entry[key] = logits[entry[key]]
    return out


def _feature_dropped_logits(name, hf_dir):
    """transformers' logits of the family's model without what sets it apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    if name == "llama3":
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    if name == "mistral":  # what the converter refuses: a window shorter than the sequence
        config.sliding_window = 128
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()
    for layer in model.model.layers:
        if name == "qwen2":
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias = None
        if name == "qwen3":
            layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    with torch.no_grad():
        return model(LONG).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_converted_family_gives_transformers_logits_where_its_feature_matters(runs, name):
    hf_dir, ours = runs[name]["hf"], runs[name]["base_logits"]
    reference = hf_logits(hf_dir, LONG)
    diff = (ours - reference).abs().max().item()
    dropped = _feature_dropped_logits(name, hf_dir)
    moved = (dropped - reference).abs().max().item()
    loss_moved = abs(next_token_loss(dropped, LONG) - next_token_loss(reference, LONG))
    print(f"{name}: TP2xPP2 vs transformers {diff:.2e}; without the feature the logits move {moved:.2e}, "
          f"the loss {loss_moved:.2e}")
    assert diff <= LOGITS_ATOL, f"{name}: max abs logit difference {diff}"
    assert moved > 100 * LOGITS_ATOL and loss_moved > 1e-4, f"{name}: the family's feature should matter here"
    assert abs(next_token_loss(ours, LONG) - next_token_loss(reference, LONG)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_continued_training_keeps_the_family_and_exports_its_class(runs, name, tmp_path):
    from megatron.training.checkpoint.save_load import read_checkpoint_args

    run = runs[name]
    # the tool's torch_dist checkpoint goes back to HF bit for bit
    assert_same_tensors(read_safetensors(run["hf"]), read_safetensors(convert("torch_dist", "hf", run["dist"],
                                                                              tmp_path / "dist_hf")))
    saved = read_checkpoint_args(run["continued"])
    family = FAMILIES[name]
    assert saved["ckpt_format"] == "torch_dist" and saved["hf_model_type"] == family["model_type"]
    assert saved["add_qkv_bias"] == (name == "qwen2") and saved["qk_layernorm"] == (name == "qwen3")
    assert saved["use_rope_scaling"] == (name == "llama3") and saved["kv_channels"] == family.get("head_dim", 16)
    exported = convert("megatron", "hf", run["continued"], tmp_path / "hf")
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["architectures"] == [CLASSES[name]]
    theirs = hf_logits(exported, SHORT)
    assert (hf_logits(run["hf"], SHORT) - theirs).abs().max() > 100 * LOGITS_ATOL, "two steps should move the model"
    diff = (run["continued_logits"] - theirs).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{name}: continued checkpoint vs its HF export {diff}"
    if name in PARITY:  # TP=2 x PP=2 and DP=4 took the same two SGD steps
        start, tp_pp = read_safetensors(run["hf"]), read_safetensors(exported)
        dp = read_safetensors(convert("megatron", "hf", run["continued_dp"], tmp_path / "hf_dp"))
        for key in start:
            moved = (tp_pp[key] - start[key]).abs().max().item()
            differ = (tp_pp[key] - dp[key]).abs().max().item()
            assert differ <= 1e-6 + 1e-3 * moved, f"{name} {key}: moved {moved:.2e}, TP2xPP2 vs DP4 {differ:.2e}"
        # the tensors the TP layout could get wrong took real steps (not k_proj's bias: softmax ignores it)
        feature = [k for k in start if k.endswith(("q_norm.weight", "k_norm.weight", "v_proj.bias"))]
        assert feature and min((tp_pp[k] - start[k]).abs().max().item() for k in feature) > 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_on_every_family_load_in_peft_and_match_the_merged_export(runs, name, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    run = runs[name]
    hf_base, ours = runs[run["family"]]["hf"], run["logits"]
    adapter = tmp_path / "adapter"
    convert("megatron", "peft", run["adapter"], adapter, "--base-model-name-or-path", hf_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_hf_as_trained(hf_base, name),
                                          str(adapter)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)], [str(w.message) for w in caught]
    written = read_safetensors(adapter)
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(written) and all(torch.equal(loaded[k], written[k]) for k in written)
    with torch.no_grad():
        theirs = model(SHORT).logits
    assert (ours - hf_logits(hf_base, SHORT)).abs().max() > 100 * ADAPTER_ATOL, "two steps should move the logits"
    diff = (theirs - ours).abs().max().item()
    assert diff <= ADAPTER_ATOL, f"{name}: PeftModel vs our TP2xPP2 logits differ by {diff}"
    merged = convert("megatron", "hf", run["adapter"], tmp_path / "merged")
    base_tensors, merged_tensors = read_safetensors(hf_base), read_safetensors(merged)
    biases = [k for k in base_tensors if k.endswith(".bias")]
    assert biases == [] if run["family"] != "qwen2" else len(biases) == 3 * 4  # q/k/v of each layer
    assert all(torch.equal(base_tensors[k], merged_tensors[k]) for k in biases)  # frozen, never quantised
    merged_diff = (hf_logits(merged, SHORT) - theirs).abs().max().item()
    print(f"{name}: PeftModel vs ours {diff:.2e}, vs the merged export {merged_diff:.2e}")
    assert merged_diff <= ADAPTER_ATOL, f"{name}: merged export vs PeftModel differ by {merged_diff}"


# ------------------------------------------------------------------ bad input

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
REFUSED = {  # name: (family whose directory it starts from, config.json changes, what the one line says)
    "unknown_model_type": ("llama3", {"model_type": "gpt_neox"}, "model_type 'gpt_neox', which no converter family "
                                                                   "reads (llama, mistral, qwen2, qwen3, bert"),
    "yarn": ("qwen2", {"rope_scaling": YARN}, "rope scaling of type 'yarn' is not supported: megatron-core's GPTModel "
                                               "implements linear position interpolation (rope_type 'linear') and "
                                               "Llama 3.x frequency scaling (rope_type 'llama3') only"),
    "dynamic": ("llama3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
                "rope scaling of type 'dynamic' is not supported"),
    "longrope": ("mistral", {"rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}},
                 "rope scaling of type 'longrope' is not supported"),
    "llama3_constants": ("llama3", {"rope_parameters": dict(FAMILIES["llama3"]["rope_parameters"],
                                                            original_max_position_embeddings=4096)},
                         "rope_type 'llama3' with original_max_position_embeddings 4096 (megatron-core: 8192)"),
    "mistral_window": ("mistral", {"sliding_window": 256}, "uses sliding-window attention (sliding_window 256 on 4 of "
                                                           "4 layers, max_position_embeddings 1024), which is not "
                                                           "supported"),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 2,
                               "layer_types": None}, "sliding_window 512 on 2 of 4 layers"),
    "mixtral": ("mistral", {"model_type": "mixtral", "num_local_experts": 8},
                "model_type 'mixtral': Mixtral is a mixture-of-experts model, which"),
    "qwen2_moe": ("qwen2", {"model_type": "qwen2_moe", "num_experts": 4},
                  "model_type 'qwen2_moe': Qwen2-MoE is a mixture-of-experts model, which"),
    "experts_in_a_llama": ("llama3", {"num_local_experts": 8}, "it configures mixture-of-experts layers "
                                                               "(num_local_experts 8), which this converter does not "
                                                               "read; it reads dense decoders"),
    "o_proj_bias": ("qwen3", {"attention_bias": True}, "biases on o_proj or the MLP are not supported"),
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("loader", ["hf", "llama2_hf"])
def test_unsupported_configs_are_one_line_errors(family_dirs, tmp_path, capsys, name, loader):
    import shutil

    from tools.checkpoint import util

    family, changes, message = REFUSED[name]
    if loader == "llama2_hf" and name == "unknown_model_type":
        message = "model_type 'gpt_neox' (architectures ['LlamaForCausalLM']), not a family this converter knows"
    model = tmp_path / "model"
    shutil.copytree(family_dirs[family], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, **changes)))
    out = tmp_path / "out"
    assert util.main(["--model-type", "GPT", "--loader", loader, "--saver", "megatron", "--load-dir", str(model),
                      "--save-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_hub_configs_of_transformers_4_convert():
    """The hub's config.json files (transformers 4: rope_theta + rope_scaling) of Llama 3.1 and Qwen2.5; Qwen2.5
    carries sliding_window 131072 with use_sliding_window false (full attention), and a window no shorter than
    the context restricts nothing: both convert, to full causal attention."""
    from megatron.training.checkpoint_convert.decoder_configs import megatron_flags_from_hf

    llama31 = {k: v for k, v in FAMILIES["llama3"].items() if k != "rope_parameters"}
    llama31.update(rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    flags = " ".join(megatron_flags_from_hf(llama31))
    assert "--rotary-base 500000 --use-rope-scaling --rope-scaling-factor 8.0" in flags

    qwen25 = dict(FAMILIES["qwen2"], num_hidden_layers=4, sliding_window=131072, use_sliding_window=False,
                  max_window_layers=28)
    assert "--add-qkv-bias" in megatron_flags_from_hf(qwen25)
    assert "--swiglu" in megatron_flags_from_hf(dict(FAMILIES["mistral"], sliding_window=1024))
