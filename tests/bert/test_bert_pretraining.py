"""pretrain_bert.py reproduces the single-process loss curve under TP=2, PP=2
and DP=2 with the distributed optimizer, and resumes exactly (fp32, CPU, gloo).

All runs start from one initial checkpoint saved by a single process (the
parallel runs load it resharded with --finetune), read the same masked
batches in the same order (the dataset's masks depend on the sample index
only) and use the binary (sentence-order) head, so the logged masked-LM and
SOP losses and the gradient norm cover every head.
"""

import pytest

import pretrain_bert  # noqa: F401 - imported here, so the forked ranks inherit megatron-core
from tests.bert.conftest import TINY_BERT
from tests.distributed.launcher import run_distributed

ITERS = 6
# fp32 on CPU: the layouts differ only in the order of reductions (all-reduce,
# split matmuls): ~1e-6 relative; a wrong shard or a dropped gradient moves
# the loss by > 1e-3 within a few steps.
RTOL = 1e-5

SCHEDULE = ["--lr", "2e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1", "--eval-interval", "1000",
            "--eval-iters", "0", "--seed", "1234", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--split", "98,1,1"]


def _worker(rank, world_size, argv):
    from megatron.training.initialize import destroy

    try:
        state = pretrain_bert.main(list(argv))
    finally:
        destroy()
    return [(h["iteration"], h["lm loss"], h.get("sop loss"), h["grad_norm"]) for h in state.history if "lm loss" in h]


def run(argv, world_size=1):
    return run_distributed(_worker, world_size=world_size, args=(tuple(argv),))[-1]


@pytest.fixture(scope="module")
def base_argv(wordpiece_data, tmp_path_factory):
    prefix, tokenizer = wordpiece_data
    cache = str(tmp_path_factory.mktemp("bert_cache"))
    return TINY_BERT + SCHEDULE + ["--data-path", prefix, "--data-cache-path", cache] + tokenizer


@pytest.fixture(scope="module")
def init_checkpoint(base_argv, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bert_init") / "ckpt")
    run(base_argv + ["--train-iters", "0", "--save", path])
    return path


@pytest.fixture(scope="module")
def reference(base_argv, init_checkpoint):
    losses = run(base_argv + ["--train-iters", str(ITERS), "--load", init_checkpoint, "--finetune"])
    assert len(losses) == ITERS and losses[-1][1] < losses[0][1], "the reference run should learn"
    return losses


def assert_same(name, losses, reference):
    assert [h[0] for h in losses] == [h[0] for h in reference], name
    for (it, lm, sop, gn), (_, ref_lm, ref_sop, ref_gn) in zip(losses, reference):
        assert lm == pytest.approx(ref_lm, rel=RTOL), f"{name}: iteration {it} lm loss {lm} vs {ref_lm}"
        assert sop == pytest.approx(ref_sop, rel=RTOL), f"{name}: iteration {it} sop loss {sop} vs {ref_sop}"
        assert gn == pytest.approx(ref_gn, rel=1e-4), f"{name}: iteration {it} grad norm {gn} vs {ref_gn}"


@pytest.mark.parametrize("name, layout", [("tp2", ["--tensor-model-parallel-size", "2"]),
                                          ("pp2", ["--pipeline-model-parallel-size", "2"])])
def test_layout_matches_single_process(name, layout, base_argv, init_checkpoint, reference):
    losses = run(base_argv + ["--train-iters", str(ITERS), "--load", init_checkpoint, "--finetune"] + layout, 2)
    assert_same(name, losses, reference)


def test_distributed_optimizer_matches_and_resumes_exactly(base_argv, init_checkpoint, reference, tmp_path):
    """DP=2 with the distributed optimizer stops after 3 iterations (saving
    weights, optimizer shards, scheduler, RNG and data position) and a second
    run resumes from that checkpoint: together they give the single-process
    curve, iteration by iteration."""
    save = str(tmp_path / "ckpt")
    layout = ["--use-distributed-optimizer", "--train-iters", str(ITERS), "--save", save]
    first = run(base_argv + layout + ["--load", init_checkpoint, "--finetune", "--exit-interval", "3"], 2)
    assert [h[0] for h in first] == [1, 2, 3]
    second = run(base_argv + layout + ["--load", save], 2)
    assert [h[0] for h in second] == [4, 5, 6]
    assert_same("dp2 distributed optimizer, resumed at 3", first + second, reference)


def test_pretraining_from_an_hf_encoder_starts_fresh_heads(wordpiece_data, tmp_path):
    """An HF BertModel (encoder and pooler, no MLM head) converts, and
    pretraining from it at PP=2 keeps its encoder, starts the LM head afresh
    and ties the last stage's output layer to the loaded embedding."""
    import torch

    from tests.bert.conftest import convert, make_hf_model

    prefix, tokenizer = wordpiece_data
    hf = make_hf_model(tmp_path / "hf", "bert_encoder", vocab_size=1000, hidden_size=64, intermediate_size=256,
                       max_position_embeddings=32)
    start = convert("hf", "megatron", hf, tmp_path / "mg", "--target-pipeline-parallel-size", "2",
                    "--make-vocab-size-divisible-by", "64")
    saved = str(tmp_path / "saved")
    argv = SCHEDULE + tokenizer + ["--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
                                   "--load", start, "--finetune", "--use-checkpoint-args", "--seq-length", "32",
                                   "--pipeline-model-parallel-size", "2", "--bert-no-binary-head",
                                   "--ckpt-format", "torch"]  # the test reads the per-rank files
    run(argv + ["--train-iters", "0", "--save", saved], 2)
    first = torch.load(f"{saved}/iter_0000000/mp_rank_00_000/model_optim_rng.pt", weights_only=True)["model"]
    last = torch.load(f"{saved}/iter_0000000/mp_rank_00_001/model_optim_rng.pt", weights_only=True)["model"]
    from safetensors.torch import load_file

    weights = load_file(f"{hf}/model.safetensors")
    assert torch.equal(first["embedding.word_embeddings.weight"][:1000], weights["embeddings.word_embeddings.weight"])
    assert torch.equal(last["encoder.layers.0.mlp.linear_fc2.weight"], weights["encoder.layer.1.output.dense.weight"])
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])  # tied copy
    assert (last["output_layer.bias"] == 0).all() and "lm_head.dense.weight" in last  # fresh LM head
    losses = run(argv + ["--train-iters", "3"], 2)
    assert len(losses) == 3 and all(l[1] == l[1] and l[1] < 10 for l in losses)  # finite, near ln(1000) = 6.9


def test_roberta_style_pretraining(roberta_data, tmp_path):
    """RoBERTa's conventions through the driver: pad id 1, positions from 2,
    one token type, no binary head; the loss starts near ln(vocabulary) and falls."""
    prefix, tokenizer = roberta_data
    argv = [a for a in TINY_BERT] + SCHEDULE + tokenizer + [
        "--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"), "--position-ids-offset", "2",
        "--max-position-embeddings", "34", "--num-tokentypes", "1", "--bert-no-binary-head", "--train-iters", "6",
        "--norm-epsilon", "1e-5"]
    losses = run(argv)
    assert len(losses) == 6 and 5.5 < losses[0][1] < 7.5 and losses[-1][1] < losses[0][1]
