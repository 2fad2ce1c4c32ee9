"""finetune_gpt.py on the SFT dataset: packed and padded samples give the same
per-example loss, and TP=2 / PP=2 reproduce the single-process loss curve
(SGD with momentum, packed samples) from one initial checkpoint loaded with
--finetune, as tests/training/test_parity.py does for pretraining."""

import json
import random
import sys

import pytest

from tests.distributed.launcher import ROOT, run_distributed
from tests.training.pretrain_runner import TINY_LLAMA, run_pretrain

VOCAB = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
SCHEDULE = ["--lr", "0.05", "--lr-decay-style", "constant", "--optimizer", "sgd", "--sgd-momentum", "0.9",
            "--weight-decay", "0", "--clip-grad", "1.0", "--log-interval", "1", "--eval-interval", "1000",
            "--seed", "1234", "--micro-batch-size", "2", "--global-batch-size", "8"]
ITERS = 5
RTOL = 1e-5  # as test_parity.py: only the reduction order differs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train prefix, valid prefix): sort a few numbers (PandaLLM records)."""
    from megatron.training.data.sft_preprocess import SFTPreprocessConfig, preprocess_sft

    tmp = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    prefixes = []
    for name, n in (("train", 80), ("valid", 16)):
        with open(tmp / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                a = [rng.randrange(1, 250) for _ in range(rng.randrange(2, 9))]
                f.write(json.dumps({"input": " ".join(map(str, a)), "target": " ".join(map(str, sorted(a)))}) + "\n")
        prefix = str(tmp / name)
        preprocess_sft(SFTPreprocessConfig(input=str(tmp / f"{name}.jsonl"), output_prefix=prefix,
                                           tokenizer_type="NullTokenizer", vocab_size=255), log=lambda m: None)
        prefixes.append(prefix)
    return prefixes


def run_finetune(argv, world_size=1):
    return run_pretrain(argv, world_size, entry_point="finetune_gpt")


def _per_example_losses(rank, world_size, argv, prefix):
    """{example id: mean response loss} for padded and for packed samples."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    from megatron.training import arguments, training
    from megatron.training.data.sft_dataset import SFTDataset, add_sft_args
    from megatron.training.initialize import destroy
    from megatron.training.models.llama import build_gpt_model

    try:
        args = training.setup_args(list(argv), add_sft_args)
        training.build_tokenizer_from_args(args)
        model = build_gpt_model(args, arguments.transformer_config_from_args(args)).eval()
        out = []
        for packing in (False, True):
            ds = SFTDataset(prefix, args.seq_length, packing=packing, shuffle=False)
            losses = {}
            for i in range(len(ds)):
                s = ds[i]
                with torch.no_grad():
                    per_token = model(s["tokens"][None], s["position_ids"][None], s.get("attention_mask", None)
                                      if packing else None, labels=s["labels"][None])[0]
                pos = 0
                for ex in ds.sample_examples(i).tolist():
                    n = ds.used[ex]
                    # labels of this example: positions pos .. pos+n-2 (its last token's label is the next one's)
                    m = s["loss_mask"][pos:pos + n - 1]
                    losses[ex] = float((per_token[pos:pos + n - 1] * m).sum() / m.sum())
                    pos += n
            out.append(losses)
        return out
    finally:
        destroy()


def test_packed_and_padded_give_the_same_per_example_loss(data):
    argv = TINY_LLAMA + VOCAB + SCHEDULE + ["--train-iters", "1", "--data-path", data[1]]
    padded, packed = run_distributed(_per_example_losses, world_size=1, args=(tuple(argv), data[1]))[0]
    assert sorted(padded) == sorted(packed) == list(range(16))
    for ex in padded:
        # fp32: the block-diagonal mask and the causal path differ only in summation order
        assert packed[ex] == pytest.approx(padded[ex], rel=1e-5), f"example {ex}"
    assert len(set(round(v, 4) for v in padded.values())) > 8  # genuinely different examples


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory, data):
    ckpt = str(tmp_path_factory.mktemp("init") / "ckpt")
    run_finetune(TINY_LLAMA + VOCAB + SCHEDULE + ["--data-path", data[0], "--train-iters", "0", "--eval-iters", "0",
                                                 "--save", ckpt])
    return ckpt


def _train(ckpt, data, world_size, layout):
    argv = TINY_LLAMA + VOCAB + SCHEDULE + [
        "--data-path", data[0], "--sft-packing", "--train-iters", str(ITERS), "--eval-iters", "0",
        "--load", ckpt, "--finetune"] + layout
    return run_finetune(argv, world_size)


@pytest.fixture(scope="module")
def reference(init_checkpoint, data):
    losses = _train(init_checkpoint, data, 1, [])
    assert len(losses) == ITERS
    assert losses[-1][1] < losses[0][1] - 0.05, "SGD with momentum should lower the response loss"
    return losses


@pytest.mark.parametrize("name,world_size,layout", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
])
def test_layout_matches_single_process(name, world_size, layout, init_checkpoint, data, reference):
    losses = _train(init_checkpoint, data, world_size, layout)
    assert [it for it, _, _ in losses] == [it for it, _, _ in reference]
    for (it, ref, ref_gn), (_, got, gn) in zip(reference, losses):
        assert got == pytest.approx(ref, rel=RTOL), f"{name}: iteration {it} loss {got} vs single-process {ref}"
        assert gn == pytest.approx(ref_gn, rel=1e-4), f"{name}: iteration {it} grad norm {gn} vs {ref_gn}"
