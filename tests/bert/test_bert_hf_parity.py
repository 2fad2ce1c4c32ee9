"""HF BERT, RoBERTa and Megatron-BERT models (random weights, every LayerNorm
perturbed) converted to Megatron give transformers' outputs under TP=1, TP=2,
PP=2 and TP=2 + sequence parallelism (and TP=2 with SDPA attention), at the
non-pad positions of a right-padded batch; the stock pre-LN mapping of a
post-LN BERT does not (negative control); the masked-LM loss of a masked batch
from the BERT dataset equals RobertaForMaskedLM's; HF -> Megatron -> HF is
bitwise for every supported class. The independent reference is transformers.

Megatron-side outputs come from the driver's own model and loader
(megatron/training/bert/inference.py) on gloo processes; a checkpoint written
at TP=1 is resharded on load to the other layouts, and the converter's own
TP=2 and PP=2 output is loaded as saved.
"""

import contextlib
import io

import pytest
import torch

import pretrain_bert
from megatron.training.bert import inference as bert_inference  # noqa: F401 - imported once here, inherited by the forked ranks
from tests.bert.conftest import HF_MODELS, convert
from tests.distributed.launcher import run_distributed

# fp32 on CPU: the layouts differ only in the order of reductions (split
# matmuls, all-reduce), ~1e-6; a swapped LayerNorm or a wrong qkv row order
# moves the outputs by > 1e-1, the tanh GELU alone by ~1e-4.
ATOL = 1e-5

LAYOUTS = {  # name: (TP, PP, extra flags)
    "tp1": (1, 1, []),
    "tp2": (2, 1, []),
    "pp2": (1, 2, []),
    "tp2_sp": (2, 1, ["--sequence-parallel"]),
    # The other layouts run the default core attention, SDPA with a key-padding mask; this one
    # megatron-core's unfused softmax path.
    "tp2_unfused": (2, 1, ["--attention-backend", "unfused"]),
}
# What each model's heads compute, compared with transformers' output field.
KINDS = {
    "bert_pretraining": {"lm": "prediction_logits", "binary": "seq_relationship_logits"},
    "roberta_mlm": {"lm": "logits"},
    "megatron_bert_pretraining": {"lm": "prediction_logits", "binary": "seq_relationship_logits"},
    "bert_classifier": {"classes": "logits"},
    "roberta_classifier": {"classes": "logits"},
    "bert_encoder": {"hidden": "last_hidden_state"},
}


def batch_for(name, seq=24, seed=3):
    """Right-padded ids (row 1 has 7 pads, ids of pads = the pad id), mask, token types."""
    config = HF_MODELS[name][2]
    pad = config.get("pad_token_id", 0)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, config["vocab_size"], (2, seq), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, seq - 7:] = 0
    tokens[mask == 0] = pad
    types = torch.zeros_like(tokens)
    if config.get("type_vocab_size", 2) > 1:
        types[:, seq // 2:] = 1
    return tokens, mask, types


def hf_outputs(path, name, tokens, mask, types):
    import transformers

    model = getattr(transformers, HF_MODELS[name][1]).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, token_type_ids=types)
    return {kind: out[field] for kind, field in KINDS[name].items()}


def _outputs_worker(rank, world_size, jobs):
    from megatron.training import inference
    from megatron.training.bert import inference as bert_inference

    results = []
    for load_dir, tp, pp, extra, (tokens, mask, types), kinds in jobs:
        args, model = bert_inference.load_bert_model(load_dir, tp, pp, extra)
        results.append({k: bert_inference.bert_outputs(args, model, tokens, mask, types, output=k) for k in kinds})
        del model
        inference.unload()
    return results if rank == 0 else None


def _mlm_loss_worker(rank, world_size, load_dir, tp, data_argv):
    """(the masked batch, Megatron's reported lm loss) for a batch of the BERT dataset."""
    from megatron.training import arguments, inference
    from megatron.training.bert import inference as bert_inference
    from megatron.training.data.bert_dataset import build_bert_datasets
    from megatron.training.tokenizer import build_tokenizer

    args, model = bert_inference.load_bert_model(load_dir, tp)
    data_args = arguments.parse_args(data_argv, pretrain_bert.add_bert_args)
    data_args.bert_binary_head = False
    tokenizer = build_tokenizer(data_args.tokenizer_type, data_args.tokenizer_model)
    train, _, _ = build_bert_datasets(data_args, tokenizer, log=lambda msg: None)
    samples = [train[i] for i in range(4)]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("text", "labels", "loss_mask",
                                                                                  "padding_mask", "is_random")}
    with torch.no_grad():
        output = model[0](batch["text"], batch["padding_mask"], lm_labels=batch["labels"])
        _, report = pretrain_bert.loss_func(batch["loss_mask"], batch["is_random"], output)
    del model
    inference.unload()
    return batch, float(report["lm loss"])


@pytest.fixture(scope="module")
def checkpoints(hf_models, tmp_path_factory):
    """Every HF model converted at TP=1; the BERT pretraining model also at TP=2 and PP=2 by the converter."""
    root = tmp_path_factory.mktemp("mg")
    out = {name: convert("hf", "megatron", path, root / name, "--make-vocab-size-divisible-by", 64)
           for name, path in hf_models.items()}
    for name, flags in (("tp2", ["--target-tensor-parallel-size", 2]), ("pp2", ["--target-pipeline-parallel-size", 2])):
        out[f"bert_pretraining_{name}"] = convert("hf", "megatron", hf_models["bert_pretraining"],
                                                  root / f"bert_pretraining_{name}", *flags)
    for name in TORCH_DIST:  # global tensors, loaded under any layout
        out[f"{name}_dist"] = convert("hf", "torch_dist", hf_models[name], root / f"{name}_dist",
                                      "--make-vocab-size-divisible-by", 64)
    return out


TORCH_DIST = ("bert_pretraining", "roberta_classifier")  # converted to --ckpt-format torch_dist as well


def test_outputs_match_transformers_under_every_layout(hf_models, checkpoints, tmp_path):
    jobs, expected = [], []
    for name in HF_MODELS:
        batch = batch_for(name)
        reference = hf_outputs(hf_models[name], name, *batch)
        for layout, (tp, pp, extra) in LAYOUTS.items():
            if name == "bert_encoder" and layout not in ("tp1", "tp2_sp"):
                continue  # the encoder's final hidden states: covered by the others' heads elsewhere
            jobs.append((checkpoints[name], tp, pp, extra, batch, list(KINDS[name])))
            expected.append((f"{name} {layout}", reference, batch[1]))
    batch = batch_for("bert_pretraining")
    reference = hf_outputs(hf_models["bert_pretraining"], "bert_pretraining", *batch)
    for layout, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):  # the converter's own layouts, loaded as saved
        jobs.append((checkpoints[f"bert_pretraining_{layout}"], tp, pp, [], batch, ["lm", "binary"]))
        expected.append((f"bert_pretraining saved at {layout}", reference, batch[1]))
    for name in TORCH_DIST:  # torch_dist checkpoints, loaded under a TP and a PP layout
        batch = batch_for(name)
        reference = hf_outputs(hf_models[name], name, *batch)
        for layout, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
            jobs.append((checkpoints[f"{name}_dist"], tp, pp, [], batch, list(KINDS[name])))
            expected.append((f"{name} torch_dist at {layout}", reference, batch[1]))

    got = run_distributed(_outputs_worker, world_size=2, args=(jobs,))[0]
    for (label, reference, mask), outputs in zip(expected, got):
        for kind, ref in reference.items():
            out = outputs[kind]
            if kind == "lm":
                assert out.shape[-1] % 64 == 0 and out.shape[-1] > ref.shape[-1]  # the padded rows are there
                out = out[..., :ref.shape[-1]]
            if out.dim() == 3:  # per-position outputs: non-pad positions only
                out, ref = out[mask.bool()], ref[mask.bool()]
            diff = (out - ref).abs().max().item()
            assert diff <= ATOL, f"{label} {kind}: max abs difference {diff}"


def test_stock_pre_ln_mapping_of_bert_fails(hf_models, checkpoints, tmp_path):
    """Negative control: the same weights in megatron-core's stock (pre-LN)
    layer order are far from transformers' BERT, so the test above can fail."""
    import shutil

    pre_ln = tmp_path / "pre_ln"
    shutil.copytree(checkpoints["bert_pretraining"], pre_ln)
    rank_file = pre_ln / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=True)
    state["args"]["apply_residual_connection_post_layernorm"] = False
    torch.save(state, rank_file)
    batch = batch_for("bert_pretraining")
    reference = hf_outputs(hf_models["bert_pretraining"], "bert_pretraining", *batch)["lm"]
    got = run_distributed(_outputs_worker, world_size=1, args=([(str(pre_ln), 1, 1, [], batch, ["lm"])],))[0][0]
    diff = (got["lm"][..., :reference.shape[-1]] - reference)[batch[1].bool()].abs().max().item()
    # tiny random models have small logits (|logit| < ~2): 0.1 is 10^4 x ATOL
    assert diff > 0.1, f"the pre-LN order reproduced post-LN BERT (max abs difference {diff})"


def test_mlm_loss_equals_transformers_on_a_masked_batch(roberta_tokenizer, roberta_data, tmp_path):
    """RoBERTa (pad id 1) on a batch of the BERT dataset: Megatron's reported
    "lm loss" (TP=1 and TP=2, vocabulary padded 600 -> 640) equals
    RobertaForMaskedLM's loss with the same labels (-100 where not masked)."""
    from transformers import RobertaForMaskedLM

    from megatron.training.tokenizer import build_tokenizer
    from tests.bert.conftest import make_hf_model

    vocab = build_tokenizer("HuggingFaceTokenizer", roberta_tokenizer).vocab_size
    hf_dir = make_hf_model(tmp_path / "hf", "roberta_mlm", vocab_size=vocab, max_position_embeddings=34)
    mg = convert("hf", "megatron", hf_dir, tmp_path / "mg", "--make-vocab-size-divisible-by", 64,
                 "--tokenizer-model", roberta_tokenizer)
    prefix, tok_flags = roberta_data
    data_argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1", "--train-iters", "1",
                 "--data-path", prefix,
                 "--split", "100,0,0", "--eval-iters", "0", "--data-cache-path", str(tmp_path / "cache"), *tok_flags]
    model = RobertaForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for tp in (1, 2):
        batch, loss = run_distributed(_mlm_loss_worker, world_size=tp, args=(mg, tp, data_argv))[0]
        assert (batch["text"][batch["padding_mask"] == 0] == 1).all()  # RoBERTa's pad id, not 0 (<s>)
        assert batch["loss_mask"].sum() > 0 and (batch["padding_mask"] == 0).any()
        labels = torch.where(batch["loss_mask"].bool(), batch["labels"], torch.full_like(batch["labels"], -100))
        with torch.no_grad():
            reference = model(batch["text"], attention_mask=batch["padding_mask"], labels=labels).loss.item()
        # fp32: one cross-entropy over the same logits, reduced in another order
        assert loss == pytest.approx(reference, abs=1e-5), f"TP={tp}: lm loss {loss} vs transformers {reference}"


def _read(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_hf_to_megatron_to_hf_is_bitwise(hf_models, checkpoints, tmp_path):
    import json

    trips = [(name, path, checkpoints[name]) for name, path in hf_models.items()]
    trips += [(f"{name} via torch_dist", hf_models[name], checkpoints[f"{name}_dist"]) for name in TORCH_DIST]
    for label, path, checkpoint in trips:
        back = convert("megatron", "hf", checkpoint, tmp_path / label.replace(" ", "_"))
        source, exported = _read(path), _read(back)
        assert sorted(source) == sorted(exported), f"{label}: {sorted(set(source) ^ set(exported))}"
        for key, value in source.items():
            assert torch.equal(value, exported[key]), f"{label}: {key} changed"
        with open(f"{back}/config.json") as f:
            assert json.load(f)["architectures"] == [HF_MODELS[label.split()[0]][1]]


def _verify_worker(rank, world_size, argv):
    from tools.checkpoint import util

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = util.main(argv)
    return rc, out.getvalue()


def test_verify_compares_outputs_of_both_sides(hf_models, checkpoints, tmp_path):
    """--verify on an export: the classifier's class logits, and the LM logits
    of a pretraining model exported from a PP=2 checkpoint and from torch_dist;
    the report names them, and an encoder without heads has hidden states, not logits."""
    from megatron.training.checkpoint_convert.bert import verify_outputs_name
    from megatron.training.checkpoint_convert.verify import Side

    compared = {"roberta_classifier": "class logits", "bert_pretraining_pp2": "masked-LM logits",
                "bert_pretraining_dist": "masked-LM logits"}
    for name, what in compared.items():
        argv = ["--model-type", "BERT", "--loader", "megatron", "--saver", "hf", "--load-dir", checkpoints[name],
                "--save-dir", str(tmp_path / name), "--verify", "--verify-atol", "1e-5"]
        rc, out = run_distributed(_verify_worker, world_size=1, args=(argv,))[0]
        line = [x for x in out.splitlines() if x.startswith("verify:")]
        assert rc == 0 and len(line) == 1 and "max abs diff" in line[0], out
        assert line[0].startswith(f"verify: {what} on "), line[0]
        # the Megatron side ran as it was saved (the PP=2 checkpoint on two processes)
        saved = "TP=1 PP=2 on 2 processes" if name.endswith("pp2") else "TP=1 PP=1 on 1 process"
        assert f"(run as saved: {saved})" in line[0], line[0]
    hidden = "final hidden states (an encoder without heads: no logits)"
    assert verify_outputs_name(Side("megatron", checkpoints["bert_encoder"])) == hidden
    assert verify_outputs_name(Side("hf", hf_models["bert_encoder"])) == hidden
    assert verify_outputs_name(Side("hf", hf_models["roberta_mlm"])) == "masked-LM logits"
