"""A new user's first hour with a Hugging Face Llama that nobody here made:
a tokenizer.json-only model (no tokenizer.model) goes through the README's
HF -> Megatron command as written, --verify runs the saved TP=2 x PP=2 layout
against transformers, and continued pretraining with `--finetune
--use-checkpoint-args` and no model, dropout or tokenizer flags starts at
exactly transformers' loss on the same batch.

The model's weights are drawn with a large initializer range, so its forward
pass is sensitive to dropout: the parser's default dropout of 0.1 moves the
first loss by tenths, which is what --use-checkpoint-args used to keep."""

import json
import os
import re
import shlex

import pytest
import torch

from tests.distributed.launcher import ROOT, run_distributed

# fp32 on CPU; the two implementations differ only in the order of reductions
# (~1e-7 relative); a dropout mask, a missing rotary setting or a wrong
# tokenizer changes the loss by far more (>1e-2).
LOSS_REL = 1e-5
VOCAB = 512  # a multiple of 128 x TP=2: Megatron's vocabulary padding adds no rows to the softmax


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(HF directory with tokenizer.json only, jsonl corpus) of a random tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron.training.data.sample_corpus import sample_documents, train_sample_hf_tokenizer

    root = tmp_path_factory.mktemp("first_hour")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_documents()[:60]))
    hf = str(root / "hf")
    train_sample_hf_tokenizer(str(corpus), hf, vocab_size=VOCAB)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False,
        initializer_range=0.3)).save_pretrained(hf)
    assert not os.path.exists(os.path.join(hf, "tokenizer.model"))
    return hf, str(corpus)


def readme_command(first_words: str) -> list:
    """The README_en.md command starting with `first_words`, continuation lines joined, as argv."""
    text = open(os.path.join(ROOT, "README_en.md"), encoding="utf-8").read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(first_words))
    return shlex.split(line)


@pytest.fixture(scope="module")
def converted(hf_llama, tmp_path_factory):
    """The README's HF -> Megatron command (with --verify) on the tokenizer.json-only model: (checkpoint, stdout)."""
    import contextlib
    import io

    from tools.checkpoint import util

    argv = readme_command("python tools/checkpoint/util.py --model-type GPT --loader llama2_hf")
    ckpt = str(tmp_path_factory.mktemp("converted") / "ckpt")
    argv = [{"HF_DIR": hf_llama[0], "CKPT": ckpt}.get(a, a) for a in argv[2:]]
    assert "--verify" in argv and argv[argv.index("--target-pipeline-parallel-size") + 1] == "2"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert util.main(argv) == 0
    return ckpt, out.getvalue()


def test_the_readme_recipe_converts_and_verify_runs_the_saved_layout(converted, hf_llama):
    ckpt, stdout = converted
    (line,) = [line for line in stdout.splitlines() if line.startswith("verify:")]
    assert f"256 tokens (4 x 64), hf {hf_llama[0]} vs megatron {ckpt} (run as saved: TP=2 PP=2 on 4 processes)" in line
    worst = float(re.search(r"max abs diff (\S+),", line).group(1))
    losses = [float(x) for x in re.search(r"next-token loss (\S+) vs (\S+) ", line).groups()]
    assert worst <= 1e-4 and losses[0] == pytest.approx(losses[1], rel=LOSS_REL), line
    assert sorted(os.listdir(os.path.join(ckpt, "release"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]


def _first_step(rank, world_size, argv):
    """pretrain_gpt.py's run with its forward step recording the first micro-batch:
    (iteration-1 loss, tokens, labels, loss mask)."""
    import pretrain_gpt
    from megatron.training.initialize import destroy
    from megatron.training.training import pretrain

    seen = []

    def recording_forward_step(args, data_iterator, model):
        batch = next(data_iterator)
        seen.append({k: batch[k].clone() for k in ("tokens", "labels", "loss_mask")})
        return pretrain_gpt.forward_step(args, iter([batch]), model)

    try:
        state = pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                         recording_forward_step, argv=list(argv))
    finally:
        destroy()
    (first,) = [h["lm loss"] for h in state.history if h["iteration"] == 1]
    return first, seen[0]


def _transformers_loss(hf_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.double()
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1),
                                               reduction="none")
    mask = batch["loss_mask"].reshape(-1).double()
    return float((losses * mask).sum() / mask.sum())


def test_continued_pretraining_starts_at_transformers_loss(converted, hf_llama, tmp_path, capfd):
    from tools.preprocess_data import main as preprocess

    hf, corpus = hf_llama
    prefix = str(tmp_path / "corpus")
    assert preprocess(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                       "--tokenizer-model", hf, "--append-eod", "--workers", "1"]) == 0
    # no model, dropout or tokenizer flags: everything the checkpoint records
    argv = ["--load", converted[0], "--finetune", "--use-checkpoint-args", "--data-path", prefix + "_text_document",
            "--split", "100,0,0", "--micro-batch-size", "2", "--seq-length", "64", "--lr", "1e-4",
            "--train-iters", "1", "--eval-iters", "0", "--log-interval", "1"]
    loss, batch = run_distributed(_first_step, 1, (argv,))[0]
    expected = _transformers_loss(hf, batch)
    assert loss == pytest.approx(expected, rel=LOSS_REL)
    assert "--use-checkpoint-args" not in capfd.readouterr().out  # nothing overridden, nothing to report

    # the negative control: the parser's old default dropout (0.1), given on the command line
    dropout = ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"]
    noisy, same_batch = run_distributed(_first_step, 1, (argv + dropout,))[0]
    assert torch.equal(same_batch["tokens"], batch["tokens"])
    assert abs(noisy - expected) > 1e-2 > 100 * LOSS_REL * expected, (noisy, expected)
    notes = [line for line in capfd.readouterr().out.splitlines() if line.startswith("> --use-checkpoint-args")]
    assert len(notes) == 1 and "--attention-dropout 0.1 (checkpoint: 0.0)" in notes[0], notes
    print(f"first loss {loss:.7f}, transformers {expected:.7f}; with dropout 0.1: {noisy:.7f}")


def test_a_recorded_tokenizer_that_is_not_here_is_one_line_naming_the_flag(converted, tmp_path):
    """The checkpoint moved to a machine without its tokenizer: --use-checkpoint-args names the recorded
    path and the flag that replaces it."""
    import shutil

    from tests.training.test_errors import _run_cases

    ckpt = str(tmp_path / "moved")
    shutil.copytree(converted[0], ckpt)
    for rank_file in [os.path.join(d, f) for d, _, files in os.walk(ckpt) for f in files if f.endswith(".pt")]:
        state = torch.load(rank_file, weights_only=True)
        state["args"]["tokenizer_model"] = "/elsewhere/tokenizer"
        torch.save(state, rank_file)
    argv = ["--load", ckpt, "--finetune", "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "2",
            "--lr", "1e-4", "--train-iters", "1", "--eval-iters", "0"]
    ((code, _, err),) = run_distributed(_run_cases, 1, ([("pretrain_gpt", argv, {})], str(tmp_path)))[0]
    assert code == 2 and err == (f"error: the tokenizer /elsewhere/tokenizer that {ckpt} records "
                                 "(--use-checkpoint-args) is not on this machine: pass --tokenizer-model PATH to a "
                                 "copy of it\n"), err
