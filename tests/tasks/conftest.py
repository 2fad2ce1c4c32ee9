"""Fixtures for the evaluation tests: a sentencepiece tokenizer and indexed
data from the sample corpus, a driver-trained Megatron checkpoint with its HF
export, and a tiny HF Llama that memorised a planted benchmark.

The planted benchmark: multiple-choice questions (FinEval CSV format) and
sentiment examples (FinGPT jsonl format) made of random words. The model is
trained on the answered prompts exactly as the evaluation renders them, so the
correct option is far more likely than the others by construction; the same
questions with a random answer key are the "shuffled" benchmark.
"""

import csv
import json
import os
import random
import re

import pytest
import torch

from megatron.training.data.sample_corpus import sample_documents, train_sample_tokenizer, write_sample_corpus

LETTERS = "ABCD"
SUBJECTS = {"accounting": 10, "finance": 10}
FINGPT_INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
NER_INSTRUCTION = "Extract the entities."  # FinGPT's is longer; short prompts keep memorisation cheap
NER_EXAMPLES = 6
# Short prompts keep memorisation cheap; the same placeholders as tasks/templates/fineval_en.json.
MC_TEMPLATE = {"description": "", "question": "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
               "answer": " {answer}", "example_separator": "\n\n"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    write_sample_corpus(path)
    return path


@pytest.fixture(scope="session")
def sp_model(corpus, tmp_path_factory):
    """500 pieces: Megatron pads the embedding to 512 rows, so padding rows exist."""
    return train_sample_tokenizer(corpus, str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=500)


@pytest.fixture(scope="session")
def indexed_corpus(corpus, sp_model, tmp_path_factory):
    from tools.preprocess_data import main as preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    assert preprocess(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "Llama2Tokenizer",
                       "--tokenizer-model", sp_model, "--legacy-tokenizer", "--append-eod", "--workers", "1"]) == 0
    return prefix + "_text_document"


def tokenizer(sp_model):
    from megatron.training.tokenizer import build_tokenizer

    return build_tokenizer("Llama2Tokenizer", sp_model)


# ------------------------------------------------------------------ the planted benchmark

def _words():
    words = {w.strip(".,:;()'\"`") for d in sample_documents()[:40] for w in d.split()}
    return sorted(w for w in words if w.isalpha() and 4 <= len(w) <= 9)


def make_benchmark(root, seed=0):
    """FinEval-layout CSVs (dev/ and val/) and a FinGPT jsonl under `root`."""
    rng = random.Random(seed)
    words = _words()
    os.makedirs(os.path.join(root, "val"))
    os.makedirs(os.path.join(root, "dev"))
    for subject, n in SUBJECTS.items():
        for split, count in (("val", n), ("dev", 3)):
            with open(os.path.join(root, split, f"{subject}_{split}.csv"), "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(count):
                    w.writerow([i, " ".join(rng.sample(words, 3)) + "?", *rng.sample(words, 4), rng.choice(LETTERS),
                                "because\nof reasons" if i == 0 else ""])
    with open(os.path.join(root, "sentiment.jsonl"), "w", encoding="utf-8") as f:
        for i in range(12):
            f.write(json.dumps({"instruction": FINGPT_INSTRUCTION, "input": " ".join(rng.sample(words, 4)) + ".",
                                "output": ("negative", "neutral", "positive")[i % 3]}) + "\n")
    with open(os.path.join(root, "ner.jsonl"), "w", encoding="utf-8") as f:
        for i in range(NER_EXAMPLES):  # 6 words; a two-word organization and a one-word person or location
            w = rng.sample(words, 6)
            other = ("person", "location")[i % 2]
            f.write(json.dumps({"instruction": NER_INSTRUCTION, "input": " ".join(w) + ".",
                                "output": f"{w[1]} {w[2]} is an organization, {w[4]} is a {other}."}) + "\n")
    with open(os.path.join(root, "template.json"), "w") as f:
        json.dump(MC_TEMPLATE, f)
    return root


def shuffle_answers(root, out, seed=1):
    """The same benchmark with a random answer key (and random sentiment labels)."""
    import shutil

    rng = random.Random(seed)
    shutil.copytree(root, out)
    for subject in SUBJECTS:
        path = os.path.join(out, "val", f"{subject}_val.csv")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        for row in rows[1:]:
            row[6] = rng.choice(LETTERS)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    path = os.path.join(out, "sentiment.jsonl")
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r, output=rng.choice(["negative", "neutral", "positive"]))) + "\n")
    swap = {"organization": "person", "person": "organization", "location": "organization"}
    path = os.path.join(out, "ner.jsonl")
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:  # the same spans with wrong types
        for r in records:
            output = re.sub(r"(organization|person|location)", lambda m: swap[m.group(1)], r["output"])
            f.write(json.dumps(dict(r, output=output.replace(" an person", " a person")
                                    .replace(" a organization", " an organization"))) + "\n")
    return out


def training_texts(root):
    """Every answered prompt the evaluation renders, zero-shot, letter and text scoring."""
    from tasks import classification, multiple_choice

    texts = []
    template = multiple_choice.check_template(MC_TEMPLATE, multiple_choice.TEMPLATE_FIELDS, "test")
    for subject in SUBJECTS:
        questions, _ = multiple_choice.read_fineval_csv(os.path.join(root, "val", f"{subject}_val.csv"))
        for q in questions:
            for scoring in ("letter", "text"):
                texts.append(multiple_choice.build_prompt(template, subject, [], q, scoring)
                             + multiple_choice.option_text(template, q, q.answer, scoring))
    examples, _, _ = classification.read_fingpt_jsonl(os.path.join(root, "sentiment.jsonl"))
    for e in examples:
        texts.append(f"Instruction: {e.instruction}\nInput: {e.input}\nAnswer: {e.label}")
    for line in open(os.path.join(root, "ner.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        texts.append(f"Instruction: {r['instruction']}\nInput: {r['input']}\nAnswer: {r['output']}")
    return texts


def train_hf_llama(texts, tok, out_dir, steps=250, seed=0):
    """A 2-layer Llama trained full-batch on `texts` (BOS + text + EOS), saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos,
        eos_token_id=tok.eos))
    seqs = [[tok.bos] + tok.tokenize(t, bos=False) + [tok.eod] for t in texts]
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = labels[i, : len(s)] = torch.tensor(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    return out_dir, float(loss)


@pytest.fixture(scope="session")
def planted(sp_model, tmp_path_factory):
    """(benchmark dir, shuffled benchmark dir, HF model dir) for the memorising model."""
    root = make_benchmark(str(tmp_path_factory.mktemp("bench") / "planted"))
    shuffled = shuffle_answers(root, str(tmp_path_factory.mktemp("bench") / "shuffled"))
    texts = training_texts(root)
    with open(os.path.join(root, "texts.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    model_dir, loss = train_hf_llama(texts, tokenizer(sp_model), str(tmp_path_factory.mktemp("planted_hf")))
    assert loss < 0.2, f"the planted model did not memorise its texts (loss {loss})"
    return root, shuffled, model_dir


# ------------------------------------------------------------------ Megatron checkpoints and runs

def eval_args(argv):
    from tasks.main import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def hf_lm(model_dir, sp_model, *extra):
    from tasks.lm import HFLanguageModel

    return HFLanguageModel(eval_args(["--task", "perplexity", "--hf-model", model_dir, "--tokenizer-type",
                                      "Llama2Tokenizer", "--tokenizer-model", sp_model, *extra]))


@pytest.fixture(scope="session")
def driver_checkpoint(indexed_corpus, sp_model, tmp_path_factory):
    """(Megatron checkpoint trained by pretrain_gpt.py for a few steps, its --saver hf export)."""
    from tests.training.pretrain_runner import SCHEDULE, TINY_LLAMA, run_pretrain
    from tools.checkpoint import util

    root = tmp_path_factory.mktemp("driver")
    ckpt = str(root / "ckpt")
    run_pretrain(TINY_LLAMA + SCHEDULE + [
        "--data-path", indexed_corpus, "--split", "100,0,0", "--tokenizer-type", "Llama2Tokenizer",
        "--tokenizer-model", sp_model, "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "4",
        "--save", ckpt])
    hf = str(root / "hf")
    assert util.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                      "--save-dir", hf]) == 0
    return ckpt, hf


@pytest.fixture(scope="session")
def planted_megatron(planted, sp_model, tmp_path_factory):
    """The planted HF model converted to a Megatron checkpoint at TP=2."""
    from tools.checkpoint import util

    out = str(tmp_path_factory.mktemp("planted_mg") / "tp2")
    assert util.main(["--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", planted[2],
                      "--save-dir", out, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "1",
                      "--make-vocab-size-divisible-by", "64", "--tokenizer-model", sp_model]) == 0
    return out


def _megatron_worker(rank, world_size, jobs):
    import contextlib
    import io

    from tasks.main import build_parser, run
    from tools.text_generation_cli import main as generation_main

    out = {}
    for name, argv in jobs:
        if name.startswith("generate"):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                assert generation_main(argv) == 0
            out[name] = buffer.getvalue()
        else:
            out[name] = run(build_parser().parse_args(argv))[0]
    return out if rank == 0 else None


@pytest.fixture(scope="session")
def megatron_runs(driver_checkpoint, indexed_corpus, planted, planted_megatron, tmp_path_factory):
    """Every Megatron-side evaluation of the tests, run once on 2 gloo processes."""
    from tests.distributed.launcher import run_distributed

    ckpt = driver_checkpoint[0]
    out = tmp_path_factory.mktemp("megatron_out")
    ppl = ["--task", "perplexity", "--load", ckpt, "--data-path", indexed_corpus, "--max-tokens", "600",
           "--seq-length", "32", "64", "--stride", "32", "16"]
    bench, _, _ = planted
    jobs = [
        ("ppl_tp2", ppl + ["--tensor-model-parallel-size", "2"]),
        ("ppl_tp1", ppl),  # both ranks: data-parallel replicas
        ("ppl_tp2_pi2", ppl + ["--tensor-model-parallel-size", "2", "--rotary-seq-len-interpolation-factor", "2"]),
        # a model that memorised its texts depends on positions: the PI factor shows
        ("ppl_planted_pi2", ["--task", "perplexity", "--load", planted_megatron, "--tensor-model-parallel-size", "2",
                             "--jsonl", os.path.join(bench, "texts.jsonl"), "--seq-length", "64",
                             "--rotary-seq-len-interpolation-factor", "2"]),
        ("fineval_tp2", ["--task", "fineval", "--load", planted_megatron, "--tensor-model-parallel-size", "2",
                         "--data-dir", bench, "--template", os.path.join(bench, "template.json"),
                         "--output", str(out / "fineval")]),
        ("fingpt_tp2", ["--task", "fingpt", "--load", planted_megatron, "--tensor-model-parallel-size", "2",
                        "--data", os.path.join(bench, "sentiment.jsonl"), "--output", str(out / "fingpt")]),
        ("generate_tp2", ["--load", planted_megatron, "--tensor-model-parallel-size", "2", "--max-new-tokens", "8",
                          "--prompt", f"Instruction: {FINGPT_INSTRUCTION}\nInput: {first_sentiment_input(bench)}\nAnswer:"]),
    ]
    results = run_distributed(_megatron_worker, world_size=2, args=(jobs,))[0]
    results["out_dir"] = str(out)
    return results


def first_sentiment_input(bench):
    with open(os.path.join(bench, "sentiment.jsonl"), encoding="utf-8") as f:
        return json.loads(f.readline())["input"]


class Interrupted(Exception):
    pass


class CountingLM:
    """A LanguageModel wrapper counting forward passes; raises after `limit`."""

    def __init__(self, lm, limit=None):
        self.lm, self.limit, self.calls = lm, limit, 0
        self.tokenizer, self.vocab_size, self.is_writer = lm.tokenizer, lm.vocab_size, True
        self.interpolation_factor = None

    def log_probs(self, tokens):
        if self.limit is not None and self.calls >= self.limit:
            raise Interrupted
        self.calls += 1
        return self.lm.log_probs(tokens)
