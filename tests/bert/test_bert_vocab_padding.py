"""BERT-family checkpoints continue under another TP although Megatron pads
the vocabulary to another size there (issue #27): the 1000-id WordPiece
vocabulary padded to a multiple of 96 x TP is 1056 rows at TP=1 and 1152 at
TP=2. A masked-LM model and a classifier saved at TP=1 continue at TP=2, and
the reverse, in both checkpoint formats, each with the single-process loss;
a torch_dist checkpoint resumes under the other TP with its optimizer state;
another --make-vocab-size-divisible-by (64: 1024 rows) loads too; the
README's scoring recipe scores a TP=2-trained classifier on one process with
the TP=2 run's own numbers; a tokenizer with another vocabulary is the one
error, and says so.

Two launches: the TP=2 runs and the checkpoints on 2 processes (TP=1 there
is 2 data-parallel replicas), then the single-process references, the TP=1
continuations of the TP=2 checkpoints, the other padding and the README's
command on 1 process."""

import pytest

import finetune_classification  # noqa: F401 - imported here, so the forked ranks inherit megatron-core
import pretrain_bert  # noqa: F401
from megatron.training.checkpoint.save_load import read_checkpoint_args
from megatron.training.data.sample_corpus import planted_classification_records
from megatron.training.sizes import padded_vocab_size
from tests.bert.conftest import TINY_BERT
from tests.bert.test_bert_classification import write
from tests.bert.test_bert_pretraining import SCHEDULE
from tests.distributed.launcher import run_distributed
from tests.training.test_continued_pretraining import readme_command

# fp32 on CPU: the layouts differ only in the order of reductions (~1e-6
# relative); padding rows let into the softmax move the loss by log(1152/1056)
# ~ 0.09 nats, a misplaced vocabulary row by far more than 1e-5.
RTOL = 1e-5
ITERS = 3
DIVISIBLE_BY = 96
TP1, TP2 = ["--tensor-model-parallel-size", "1"], ["--tensor-model-parallel-size", "2"]
TORCH = ["--ckpt-format", "torch"]
CLS_SCHEDULE = ["--lr", "2e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
                "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1", "--seed", "1234",
                "--attention-dropout", "0", "--hidden-dropout", "0", "--micro-batch-size", "2",
                "--global-batch-size", "8"]


def _runs(rank, world_size, runs):
    """Each (entry point, argv) in turn in one process group: its losses
    [(iteration, loss)] and evaluations, or the one-line error of a UserError."""
    import importlib

    from megatron.core import parallel_state

    from megatron.training.errors import UserError
    from megatron.training.initialize import destroy

    out = []
    try:
        for entry_point, argv in runs:
            try:
                state = importlib.import_module(entry_point).main(list(argv))
            except UserError as e:
                out.append(str(e))
                continue
            finally:
                parallel_state.destroy_model_parallel()
            loss = "lm loss" if entry_point == "pretrain_bert" else "classification loss"
            out.append(([(h["iteration"], h[loss]) for h in state.history if loss in h], state.evaluations))
    finally:
        destroy()
    return out


def run(runs, world_size):
    """{name: result} of the named runs [(name, entry point, argv)] in one launch."""
    results = run_distributed(_runs, world_size, args=([(entry, argv) for _, entry, argv in runs],))[-1]
    return {name: result for (name, _, _), result in zip(runs, results)}


def losses(results, name):
    """The losses of a run that was to succeed."""
    assert not isinstance(results[name], str), f"{name}: {results[name]}"
    return results[name][0]


def assert_same(name, got, reference):
    """Iterations and losses of `got` equal `reference`'s (all of them, or the ones `got` ran)."""
    ref = dict(reference)
    assert got and all(it in ref for it, _ in got), f"{name}: iterations {got} vs {reference}"
    for it, loss in got:
        assert loss == pytest.approx(ref[it], rel=RTOL), f"{name}: iteration {it} loss {loss} vs {ref[it]}"


@pytest.fixture(scope="module")
def classification_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_cls")
    return (write(root / "train.jsonl", planted_classification_records(64, seed=1)),
            write(root / "valid.jsonl", planted_classification_records(32, seed=2)))


def test_checkpoints_continue_under_another_vocabulary_padding(wordpiece_data, wordpiece_vocab, classification_data,
                                                              tmp_path):
    prefix, tokenizer = wordpiece_data
    vocab = len(open(wordpiece_vocab).readlines())
    assert (vocab, padded_vocab_size(vocab, DIVISIBLE_BY, 1), padded_vocab_size(vocab, DIVISIBLE_BY, 2)) == (
        1000, 1056, 1152)
    assert TINY_BERT[-2] == "--make-vocab-size-divisible-by"
    model = TINY_BERT[:-2] + ["--make-vocab-size-divisible-by", str(DIVISIBLE_BY)]
    mlm = SCHEDULE + tokenizer + ["--data-path", prefix, "--data-cache-path", str(tmp_path / "cache")]
    cls = CLS_SCHEDULE + tokenizer + ["--train-data", classification_data[0], "--valid-data", classification_data[1]]
    ck = {name: str(tmp_path / name) for name in ("m1", "m1t", "m2", "m2t", "c1", "c1t", "c2", "c2t")}
    go_on = ["--finetune", "--use-checkpoint-args", "--train-iters", str(ITERS)]
    start = ["--finetune", "--use-checkpoint-args", "--train-iters", "0", "--save"]  # the weights, saved again
    resume = ["--use-checkpoint-args", "--train-iters", str(ITERS), "--ckpt-step", "2"]
    P, C = "pretrain_bert", "finetune_classification"

    # m: masked LM, c: classifier; 1/2: saved at TP=1/TP=2; t: --ckpt-format torch (else torch_dist)
    two = run([
        ("m1", P, model + mlm + TP1 + ["--train-iters", "0", "--save", ck["m1"]]),
        ("m1t", P, mlm + TP1 + ["--load", ck["m1"]] + start + [ck["m1t"]] + TORCH),
        ("mlm tp2 from m1", P, mlm + TP2 + ["--load", ck["m1"], "--save", ck["m2"], "--save-interval", "2"] + go_on),
        ("mlm tp2 from m1t", P, mlm + TP2 + ["--load", ck["m1t"]] + go_on),
        ("mlm tp1 resumes m2", P, mlm + TP1 + ["--load", ck["m2"]] + resume),
        ("m2t", P, mlm + TP2 + ["--load", ck["m1"]] + start + [ck["m2t"]] + TORCH),
        ("c1", C, cls + TP1 + ["--load", ck["m1"]] + start + [ck["c1"]]),  # the classifier starts here
        ("c1t", C, cls + TP1 + ["--load", ck["c1"]] + start + [ck["c1t"]] + TORCH),
        ("cls tp2 from c1", C, cls + TP2 + ["--load", ck["c1"], "--save", ck["c2"], "--save-interval", "2"] + go_on),
        ("cls tp2 from c1t", C, cls + TP2 + ["--load", ck["c1t"]] + go_on),
        ("cls tp1 resumes c2", C, cls + TP1 + ["--load", ck["c2"]] + resume),
        ("c2t", C, cls + TP2 + ["--load", ck["c1"]] + start + [ck["c2t"]] + TORCH),
    ], world_size=2)

    rows = {name: read_checkpoint_args(path)["padded_vocab_size"] for name, path in ck.items()}
    assert rows == {name: 1152 if "2" in name else 1056 for name in ck}, rows  # each layout's own padding

    other_vocab = tmp_path / "other_vocab.txt"  # another tokenizer: the same pieces but the last 40
    other_vocab.write_text("".join(open(wordpiece_vocab).readlines()[:-40]))
    scoring = readme_command("torchrun --nproc_per_node 1 finetune_classification.py --load cls-ckpt")
    placeholders = {"cls-ckpt": ck["c2"], "train.jsonl": classification_data[0],
                    "other.jsonl": classification_data[1], "vocab.txt": wordpiece_vocab}
    scoring = [placeholders.get(a, a) for a in scoring[4:]]  # from finetune_classification.py's flags
    divisible_by_64 = ["--make-vocab-size-divisible-by", "64"]
    one = run([
        ("mlm reference", P, mlm + ["--load", ck["m1"]] + go_on),
        ("mlm from m2t", P, mlm + ["--load", ck["m2t"]] + go_on),
        ("mlm from m1, divisible by 64", P, mlm + ["--load", ck["m1"]] + go_on + divisible_by_64),
        ("mlm from m1t, divisible by 64", P, mlm + ["--load", ck["m1t"]] + go_on + divisible_by_64),
        ("m1t resumed, divisible by 64", P, mlm + ["--load", ck["m1t"], "--use-checkpoint-args", "--train-iters", "3"]
         + divisible_by_64),
        ("other tokenizer", P, mlm + ["--vocab-file", str(other_vocab), "--load", ck["m1"]] + go_on),
        ("cls reference", C, cls + ["--load", ck["c1"]] + go_on),
        ("cls from c2t", C, cls + ["--load", ck["c2t"]] + go_on),
        ("README scoring", C, scoring),
    ], world_size=1)

    # Masked LM: TP=1 -> TP=2 in both formats, TP=2 -> TP=1 (torch; torch_dist resumed with its
    # optimizer state below), and another --make-vocab-size-divisible-by at TP=1.
    reference = losses(one, "mlm reference")
    assert len(reference) == ITERS and reference[-1][1] < reference[0][1], "the reference run should learn"
    for name in ("mlm tp2 from m1", "mlm tp2 from m1t"):
        assert_same(name, losses(two, name), reference)
    for name in ("mlm from m2t", "mlm from m1, divisible by 64", "mlm from m1t, divisible by 64"):
        assert_same(name, losses(one, name), reference)
    # Resumed under the other TP with Adam's state (the embedding's and the LM output bias's rows
    # refitted): iteration 3 of the run that saved at 2.
    assert [it for it, _ in losses(two, "mlm tp1 resumes m2")] == [3]
    assert_same("mlm tp1 resumes m2", losses(two, "mlm tp1 resumes m2"), losses(two, "mlm tp2 from m1"))

    # The classifier, the same way.
    reference = losses(one, "cls reference")
    assert len(reference) == ITERS
    for name in ("cls tp2 from c1", "cls tp2 from c1t"):
        assert_same(name, losses(two, name), reference)
    assert_same("cls from c2t", losses(one, "cls from c2t"), reference)
    assert [it for it, _ in losses(two, "cls tp1 resumes c2")] == [3]
    assert_same("cls tp1 resumes c2", losses(two, "cls tp1 resumes c2"), losses(two, "cls tp2 from c1"))

    # The README's scoring command: the TP=2-trained classifier (iteration 3) on one process gives
    # the TP=2 run's own final evaluation of the same file.
    losses(one, "README scoring")
    scored, trained = one["README scoring"][1][-1], two["cls tp2 from c1"][1][-1]
    assert scored["accuracy"] == trained["accuracy"] and scored["macro F1"] == trained["macro F1"]
    assert scored["classification loss"] == pytest.approx(trained["classification loss"], rel=RTOL)

    # Errors: another tokenizer names the two vocabularies; the torch format cannot refit Adam's state.
    assert one["other tokenizer"] == (
        f"{ck['m1']} was trained with another tokenizer: its vocabulary has 1000 token ids, the tokenizer of this run "
        f"(--tokenizer-type BertWordPieceLowerCase --vocab-file {other_vocab}) 960: use the tokenizer the checkpoint "
        "was trained with (leave the tokenizer flags out to take the checkpoint's)"), one["other tokenizer"]
    assert "this format's optimizer state is not" in one["m1t resumed, divisible by 64"], \
        one["m1t resumed, divisible by 64"]
