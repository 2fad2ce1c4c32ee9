"""tools/checkpoint: HF <-> Megatron conversion and TP/PP resharding, checked by logits.

Tiny random HF Llama models are built here; the independent reference is
`transformers.LlamaForCausalLM`. Megatron-side logits come from the training
driver's own model and loader (megatron/training/inference.py) run under the
converted layout on gloo processes, so the test fails if a shard, a qkv
row order, the vocabulary padding or the rope scaling is wrong.
"""

import json
import os

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.training.pretrain_runner import MOCK_DATA, SCHEDULE, TINY_LLAMA, run_pretrain
from tools.checkpoint import util
from tools.checkpoint_conversion import llama_checkpoint_conversion

# fp32 on CPU: the layouts differ only in the order of reductions (split
# matmuls, all-reduce); 1e-4 is the bound, far below what a wrong row
# order or a missing scaling factor gives (>1e-2).
ATOL = 1e-4

MODELS = {
    # GQA, untied, vocabulary 250 padded to a multiple of 64 x TP, linear rope scaling, rope_theta 5000
    "gqa": dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, rope_theta=5000.0,
                rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False),
    # MHA, tied embeddings
    "mha_tied": dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True),
    # 9 heads in 3 query groups: TP=3
    "nine_heads": dict(vocab_size=190, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32,
                       tie_word_embeddings=False),
}


# The decoder families beside Llama 2, from transformers' own config classes (model_type), each with what
# sets it apart: Llama 3.x rope scaling (factor 8 and the fixed constants megatron-core has), Qwen2's q/k/v
# biases (tied embeddings, like the small Qwen2.5 models), Qwen3's per-head q/k RMSNorm with a head_dim of 32
# where hidden / heads is 16, Mistral without sliding window. hidden 64 and FFN 128 for the QLoRA
# reference (bitsandbytes dequantises right on CPU for widths that are multiples of 64).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_FAMILY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
FAMILIES = {
    "llama3": dict(_FAMILY_BASE, model_type="llama", max_position_embeddings=16384, rope_parameters=LLAMA3_ROPE),
    "qwen2": dict(_FAMILY_BASE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(_FAMILY_BASE, model_type="qwen3", head_dim=32),
    "mistral": dict(_FAMILY_BASE, model_type="mistral", sliding_window=None),
}
# q_proj and k_proj weights x this in the family models: attention sharp enough that positions far apart
# (Llama 3 scaling) and the q/k scale (Qwen3's norm) move the logits visibly; not sharper, as fp32 itself
# then drifts: Llama 3 x 12 stays 2.6e-6 from a float64 forward (x 16: 1.2e-5), its scaling moves the logits by 0.3
SHARPEN = {"llama3": 12.0, "qwen2": 1.0, "qwen3": 16.0, "mistral": 1.0}


def make_hf_model(path, seed=0, model_type="llama", sharpen=1.0, **config):
    """A random HF model of `model_type` (transformers' own class) saved at `path`: norm weights random
    in [0.5, 1.5], biases N(0, 0.5), so a swapped norm or a lost bias shows in the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(sharpen)
    model.save_pretrained(path)
    return str(path)


def hf_logits(path, tokens, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def convert(loader, saver, load, save, *extra):
    rc = util.main(["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", str(load),
                    "--save-dir", str(save), *map(str, extra)])
    assert rc == 0
    return str(save)


def to_megatron(hf_dir, save, tp=1, pp=1, *extra):
    return convert("llama2_hf", "megatron", hf_dir, save, "--target-tensor-parallel-size", tp,
                   "--target-pipeline-parallel-size", pp, "--make-vocab-size-divisible-by", 64, *extra)


def tokens_for(vocab, length=24, seed=1):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits_worker(rank, world_size, jobs):
    """Megatron logits for each (checkpoint, tp, pp, tokens) job, all in one process group."""
    from megatron.training import inference

    out = []
    for load_dir, tp, pp, tokens in jobs:
        args, model = inference.load_model(load_dir, tp, pp)
        out.append(inference.forward_logits(args, model, tokens))
        del model
        inference.unload()
    return out if rank == 0 else None


def megatron_logits(jobs, world_size):
    return run_distributed(_logits_worker, world_size=world_size, args=(jobs,))[0]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_model(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def pi_checkpoint(tmp_path_factory):
    """A Megatron model trained a few steps with position interpolation (factor 2) at seq 32."""
    ckpt = str(tmp_path_factory.mktemp("pi") / "ckpt")
    run_pretrain(TINY_LLAMA + MOCK_DATA + SCHEDULE + [
        "--rotary-seq-len-interpolation-factor", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "3", "--save", ckpt])
    return ckpt


# ------------------------------------------------------------------ logits under TP / PP layouts

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2_pp2": (2, 2)}


def test_hf_to_megatron_logits_under_every_layout(hf_dirs, pi_checkpoint, tmp_path):
    """HF -> Megatron at TP1/TP2/PP2/TP2xPP2 gives transformers' logits; plus the
    PI-trained model exported to HF matches its Megatron logits beyond its context."""
    jobs, expected = [], []
    for name in ("gqa", "mha_tied"):  # mha_tied under PP: the last stage's output layer is the embedding's copy
        tokens = tokens_for(MODELS[name]["vocab_size"])
        reference = hf_logits(hf_dirs[name], tokens)
        for layout, (tp, pp) in LAYOUTS.items():
            jobs.append((to_megatron(hf_dirs[name], tmp_path / f"{name}_{layout}", tp, pp), tp, pp, tokens))
            expected.append((f"{name} {layout}", reference, MODELS[name]["vocab_size"]))

    long_tokens = tokens_for(256, length=64)  # twice the trained context of 32
    pi_hf = convert("megatron", "hf", pi_checkpoint, tmp_path / "pi_hf")
    jobs.append((pi_checkpoint, 1, 1, long_tokens))

    got = megatron_logits(jobs, world_size=4)
    for (label, reference, vocab), logits in zip(expected, got):
        assert logits.shape[-1] % 64 == 0 and logits.shape[-1] > vocab  # padded rows are there
        diff = (logits[..., :vocab] - reference).abs().max().item()
        assert diff <= ATOL, f"{label}: max abs logit difference {diff}"

    with open(os.path.join(pi_hf, "config.json")) as f:
        assert json.load(f)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    exported_diff = (got[-1][..., :256] - hf_logits(pi_hf, long_tokens)).abs().max().item()
    assert exported_diff <= ATOL
    unscaled = hf_logits(pi_hf, long_tokens, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    unscaled_diff = (got[-1][..., :256] - unscaled).abs().max().item()
    assert unscaled_diff > max(ATOL, 100 * exported_diff), "without the factor the logits should differ"


def test_nine_heads_three_groups_at_tp3(hf_dirs, tmp_path):
    tokens = tokens_for(MODELS["nine_heads"]["vocab_size"])
    ckpt = to_megatron(hf_dirs["nine_heads"], tmp_path / "tp3", 3, 1)
    (logits,) = megatron_logits([(ckpt, 3, 1, tokens)], world_size=3)
    assert (logits[..., :190] - hf_logits(hf_dirs["nine_heads"], tokens)).abs().max().item() <= ATOL


# ------------------------------------------------------------------ bitwise round trips

def read_safetensors(path):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def read_megatron(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        if "model_optim_rng.pt" in files:
            state = torch.load(os.path.join(dirpath, "model_optim_rng.pt"), weights_only=True)
            out[os.path.relpath(dirpath, root)] = {k: v for k, v in state.items() if k.startswith("model")}
    return out


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name,tp,pp", [("gqa", 2, 2), ("mha_tied", 2, 2)] + [(f, 2, 2) for f in FAMILIES])
def test_hf_to_megatron_to_hf_is_bitwise(hf_dirs, family_dirs, tmp_path, name, tp, pp):
    source = {**hf_dirs, **family_dirs}[name]
    mg = to_megatron(source, tmp_path / "mg", tp, pp)
    back = convert("megatron", "hf", mg, tmp_path / "hf", "--max-shard-size", "30KB")
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))  # several shards
    assert_same_tensors(read_safetensors(source), read_safetensors(back))
    keys = ("vocab_size", "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_parameters", "rms_norm_eps",
            "model_type", "architectures")
    from transformers import AutoConfig

    a, b = AutoConfig.from_pretrained(source).to_dict(), AutoConfig.from_pretrained(back).to_dict()
    for config in (a, b):  # Qwen2Config has no head_dim: its attention takes hidden / heads
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_megatron_reshard_round_trip_is_bitwise(hf_dirs, tmp_path):
    start = to_megatron(hf_dirs["gqa"], tmp_path / "tp2pp2", 2, 2)
    single = convert("megatron", "megatron", start, tmp_path / "tp1pp1", "--target-tensor-parallel-size", 1,
                     "--target-pipeline-parallel-size", 1)
    assert list(read_megatron(single)) == ["release/mp_rank_00"]
    again = convert("megatron", "megatron", single, tmp_path / "again", "--target-tensor-parallel-size", 2,
                    "--target-pipeline-parallel-size", 2)
    assert_same_tensors(read_megatron(start), read_megatron(again))
    # through an interleaved (virtual pipeline) layout as well
    vp = convert("megatron", "megatron", start, tmp_path / "vp", "--target-tensor-parallel-size", 1,
                 "--target-pipeline-parallel-size", 2, "--target-num-layers-per-virtual-pipeline-stage", 1)
    assert sorted(read_megatron(vp)["release/mp_rank_00_000"]) == ["model0", "model1"]
    back = convert("megatron", "megatron", vp, tmp_path / "from_vp", "--target-tensor-parallel-size", 2,
                   "--target-pipeline-parallel-size", 2)
    assert_same_tensors(read_megatron(start), read_megatron(back))


def test_transformer_engine_names_round_trip_bitwise(hf_dirs, tmp_path):
    """--saver-transformer-impl transformer_engine writes the norms under TE's
    fused names (megatron-core's TE layer spec: the norm lives in the next
    linear layer); the loader reads them back to the same HF tensors."""
    te = to_megatron(hf_dirs["gqa"], tmp_path / "te", 2, 2, "--saver-transformer-impl", "transformer_engine")
    for rank, state in read_megatron(te).items():
        names = state["model"]
        assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names), rank
        assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"} <= set(names), rank
    # A checkpoint written by TE >= 1.14 holds each module's FP8 state as a uint8 tensor: plant some.
    for dirpath, _, files in os.walk(te):
        if "model_optim_rng.pt" in files:
            path = os.path.join(dirpath, "model_optim_rng.pt")
            state = torch.load(path, weights_only=True)
            for name in list(state["model"]):
                if name.endswith("linear_qkv._extra_state"):
                    state["model"][name] = torch.arange(7, dtype=torch.uint8)
                    state["model"][name.replace("linear_qkv", "core_attention")] = torch.ones(3, dtype=torch.uint8)
            torch.save(state, path)
    back = convert("megatron", "hf", te, tmp_path / "hf")
    assert_same_tensors(read_safetensors(hf_dirs["gqa"]), read_safetensors(back))
    local = convert("megatron", "megatron", te, tmp_path / "local", "--saver-transformer-impl", "local")
    assert_same_tensors(read_megatron(to_megatron(hf_dirs["gqa"], tmp_path / "direct", 2, 2)), read_megatron(local))


def test_tied_embedding_last_stage_gets_its_copy(hf_dirs, tmp_path):
    mg = read_megatron(to_megatron(hf_dirs["mha_tied"], tmp_path / "pp2", 1, 2))
    first, last = mg["release/mp_rank_00_000"]["model"], mg["release/mp_rank_00_001"]["model"]
    assert torch.equal(first["embedding.word_embeddings.weight"], last["output_layer.weight"])
    single = read_megatron(to_megatron(hf_dirs["mha_tied"], tmp_path / "pp1"))["release/mp_rank_00"]["model"]
    assert "output_layer.weight" not in single and "output_layer._extra_state" in single


# ------------------------------------------------------------------ tokenizers

@pytest.mark.parametrize("kind", ["sentencepiece", "hf_dir"])
def test_tokenizer_travels_to_megatron_and_back_to_hf(kind, sp_model, hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron.training.tokenizer import build_tokenizer

    tokenizer = sp_model if kind == "sentencepiece" else hf_dir
    megatron_type = "Llama2Tokenizer" if kind == "sentencepiece" else "HuggingFaceTokenizer"
    ours = build_tokenizer(megatron_type, tokenizer)
    hf = make_hf_model(tmp_path / "hf", **dict(MODELS["mha_tied"], vocab_size=ours.vocab_size))
    mg = to_megatron(hf, tmp_path / "mg", 2, 1, "--tokenizer-model", tokenizer)
    args = read_megatron_args(mg)
    assert (args["tokenizer_type"], args["tokenizer_model"]) == (megatron_type, os.path.abspath(tokenizer))
    back = convert("megatron", "hf", mg, tmp_path / "back")
    # (no runs of spaces: the sample sentencepiece model strips them, Llama's own does not, and
    # transformers' LlamaTokenizer follows Llama's settings)
    text = "The interpreter reads 42 lines, then returns (x + y) * 3."
    loaded = AutoTokenizer.from_pretrained(back)
    assert loaded(text).input_ids == ours.tokenize(text)
    with open(os.path.join(back, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == ours.eod


def read_megatron_args(root):
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        it = f.read().strip()
    sub = "release" if it == "release" else f"iter_{int(it):07d}"
    rank = sorted(os.listdir(os.path.join(root, sub)))[0]
    return torch.load(os.path.join(root, sub, rank, "model_optim_rng.pt"), weights_only=True)["args"]


# ------------------------------------------------------------------ bad input

def failing(capsys, argv):
    assert util.main(["--model-type", "GPT", *map(str, argv)]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--target-tensor-parallel-size", 3], "divides all three (1, 2)"),
    (["--target-pipeline-parallel-size", 3], "does not divide the model's 4 layers: use one of 1, 2, 4"),
])
def test_layout_the_model_cannot_hold(hf_dirs, tmp_path, capsys, flags, message):
    err = failing(capsys, ["--loader", "llama2_hf", "--load-dir", hf_dirs["gqa"], "--save-dir", tmp_path / "out",
                           *flags])
    assert message in err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(str(tmp_path / "out") + ".partial")


def test_vocabulary_mismatch_with_the_tokenizer(hf_dirs, sp_model, tmp_path, capsys):
    err = failing(capsys, ["--loader", "llama2_hf", "--load-dir", hf_dirs["gqa"], "--save-dir", tmp_path / "out",
                           "--tokenizer-model", sp_model])
    assert "has 600 tokens but config.json vocab_size is 250" in err and "--tokenizer-model" in err


def test_unknown_family_and_missing_files(hf_dirs, tmp_path, capsys):
    import shutil

    other = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["mha_tied"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    err = failing(capsys, ["--loader", "hf", "--load-dir", other, "--save-dir", tmp_path / "o1"])
    assert "model_type 'gpt2'" in err and "loader_<family>.py" in err
    os.remove(other / "model.safetensors")
    (other / "config.json").write_text(json.dumps(config))
    assert "holds no model weights" in failing(capsys, ["--loader", "hf", "--load-dir", other, "--save-dir",
                                                         tmp_path / "o2"])
    assert "config.json is missing" in failing(capsys, ["--loader", "hf", "--load-dir", tmp_path / "nowhere",
                                                        "--save-dir", tmp_path / "o3"])
    assert "no latest_checkpointed_iteration.txt" in failing(capsys, ["--load-dir", hf_dirs["gqa"], "--save-dir",
                                                                      tmp_path / "o4"])


def test_failure_midway_leaves_nothing_and_existing_output_is_kept(hf_dirs, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dirs["gqa"], broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]  # the last layer: found only after most is written
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    err = failing(capsys, ["--loader", "hf", "--load-dir", broken, "--save-dir", out])
    assert "model.layers.3.mlp.down_proj.weight" in err
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "exists and is not empty" in failing(capsys, ["--loader", "hf", "--load-dir", hf_dirs["gqa"],
                                                         "--save-dir", out])
    assert (out / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------ the other entry points

def test_dongwu_megatron_to_transformers_command(hf_dirs, tmp_path, capsys):
    mg = to_megatron(hf_dirs["gqa"], tmp_path / "mg", 2, 2)
    rc = llama_checkpoint_conversion.main([
        "--convert_checkpoint_from_megatron_to_transformers", "--load_path", mg, "--save_path", str(tmp_path / "hf"),
        "--target_params_dtype", "bf16", "--make_vocab_size_divisible_by", "1", "--print-checkpoint-structure",
        "--megatron-path", "/unused"])
    assert rc == 0
    assert "decoder.layers.3.self_attention.linear_qkv.weight" in capsys.readouterr().out
    source, exported = read_safetensors(hf_dirs["gqa"]), read_safetensors(tmp_path / "hf")
    assert sorted(source) == sorted(exported)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], source[k].bfloat16()) for k in source)
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and config["torch_dtype"] == "bfloat16"


def _util_script(tmp_path, argv, megatron_logits_shift=None):
    """tools/checkpoint/util.py run as a command (a process of its own); with
    `megatron_logits_shift`, the Megatron side's --verify logits are shifted by it."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if megatron_logits_shift is None:
        command = [sys.executable, os.path.join(root, "tools", "checkpoint", "util.py")]
    else:
        command = [sys.executable, "-c", (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from megatron.training.checkpoint_convert import verify; "
            "real = verify.megatron_logits; "
            f"verify.megatron_logits = lambda *a: [(x + {megatron_logits_shift!r}, ran) for x, ran in real(*a)]; "
            "from tools.checkpoint import util; sys.exit(util.main(sys.argv[1:]))")]
    return subprocess.run(command + [str(a) for a in argv], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)


def _verify_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("verify: logits")]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def test_command_line_with_verify(hf_dirs, tmp_path):
    run = _util_script(tmp_path, [
        "--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf_dirs["gqa"],
        "--save-dir", tmp_path / "mg", "--target-tensor-parallel-size", "2", "--verify", "--megatron-path", "/unused"])
    assert run.returncode == 0, run.stderr[-3000:]
    line = _verify_line(run.stdout)
    # the source and the converted checkpoint, each with its format; the checkpoint's processes ran TP=2
    assert f"hf {hf_dirs['gqa']} vs megatron {tmp_path / 'mg'} (run as saved: TP=2 PP=1 on 2 processes): max abs diff" \
        in line
    assert "writing Megatron checkpoint (TP=2 PP=1)" in run.stderr  # the progress bar


def test_command_line_verify_fails_when_the_logits_differ(hf_dirs, tmp_path):
    """A converted model whose logits are off by 1.0 fails --verify: non-zero exit, and says why."""
    run = _util_script(tmp_path, [
        "--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf_dirs["gqa"],
        "--save-dir", tmp_path / "mg", "--verify"], megatron_logits_shift=1.0)
    assert run.returncode == 2, run.stderr[-3000:]
    line = _verify_line(run.stdout)
    assert (f"hf {hf_dirs['gqa']} vs megatron {tmp_path / 'mg'} (run as saved: TP=1 PP=1 on 1 process): "
            "max abs diff 1,") in line
    assert [e for e in run.stderr.splitlines() if e.startswith("error:")] == run.stderr.splitlines()[-1:]
    assert "verification failed" in run.stderr and str(tmp_path / "mg") in run.stderr
