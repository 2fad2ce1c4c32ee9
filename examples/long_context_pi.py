"""The context-extension story at toy scale, on CPU, in a few minutes:

1. train a tiny Llama at a short context (64 tokens) with pretrain_gpt.py;
2. its perplexity at 2x and 4x that context blows up (RoPE extrapolation);
3. continue training briefly at 256 tokens with --rotary-seq-len-interpolation-factor 4
   (position interpolation, Chen et al. 2023);
4. its perplexity beyond the original context recovers.

    python examples/long_context_pi.py [--workdir runs/long_context_pi] [--iters 600] [--pi-iters 80]

Everything is this repo's own tooling: the sample corpus (Python's language
reference, no download), tools/preprocess_data.py, pretrain_gpt.py and
tasks/main.py --task perplexity on held-out documents with a sliding window
(stride 32: every token gets at least seq_length - 32 tokens of context).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHORT, LONG, FACTOR = 64, 256, 4
EVAL_LENGTHS = (64, 128, 256)
MODEL = ["--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "352", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
         "--use-rotary-position-embeddings", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--make-vocab-size-divisible-by", "64"]


def prepare_data(workdir: str) -> dict:
    """Sample corpus split into train / held-out jsonl, a sentencepiece tokenizer, the indexed train set."""
    from megatron.training.data.sample_corpus import sample_documents, train_sample_tokenizer

    paths = {k: os.path.join(workdir, n) for k, n in
             (("train", "train.jsonl"), ("heldout", "heldout.jsonl"), ("sp", "sp"), ("data", "train"))}
    docs = sample_documents()
    held = set(range(0, len(docs), 10))  # every 10th document is held out
    for key, keep in (("train", lambda i: i not in held), ("heldout", lambda i: i in held)):
        with open(paths[key], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for i, d in enumerate(docs) if keep(i))
    paths["tokenizer"] = train_sample_tokenizer(paths["train"], paths["sp"], vocab_size=1000)
    run([sys.executable, "tools/preprocess_data.py", "--input", paths["train"], "--output-prefix", paths["data"],
         "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", paths["tokenizer"], "--legacy-tokenizer",
         "--append-eod", "--workers", "1"])
    paths["data"] += "_text_document"
    return paths


def train(paths: dict, save: str, seq_length: int, iters: int, lr: float, batch: int, extra=()) -> None:
    run([sys.executable, "pretrain_gpt.py", *MODEL, "--seq-length", str(seq_length),
         "--max-position-embeddings", str(seq_length), "--micro-batch-size", str(batch),
         "--global-batch-size", str(batch), "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
         "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1",
         "--clip-grad", "1.0", "--data-path", paths["data"], "--split", "100,0,0", "--tokenizer-type",
         "Llama2Tokenizer", "--tokenizer-model", paths["tokenizer"], "--log-interval", str(max(1, iters // 5)),
         "--eval-iters", "0", "--seed", "1234", "--save", save, *extra])


def perplexities(paths: dict, load: str, max_tokens: int, extra=()) -> dict:
    """{seq_length: perplexity} on the held-out documents."""
    out = os.path.join(os.path.dirname(load), "ppl_" + os.path.basename(load) + "_".join(extra).replace("-", ""))
    run([sys.executable, "tasks/main.py", "--task", "perplexity", "--load", load, "--jsonl", paths["heldout"],
         "--max-tokens", str(max_tokens), "--seq-length", *map(str, EVAL_LENGTHS), "--stride", "32",
         "--micro-batch-size", "8", "--output", out, *extra])
    with open(out + ".json") as f:
        return {r["seq_length"]: r["ppl"] for r in json.load(f)["rows"]}


def run(cmd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-4000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "long_context_pi"))
    p.add_argument("--iters", type=int, default=600, help="training steps at 64 tokens (batch 16)")
    p.add_argument("--pi-iters", type=int, default=80, help="continued-training steps at 256 tokens (batch 4)")
    p.add_argument("--eval-tokens", type=int, default=6000, help="held-out tokens scored per length")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    start = time.time()

    paths = prepare_data(args.workdir)
    short = os.path.join(args.workdir, "ckpt_64")
    extended = os.path.join(args.workdir, "ckpt_pi_256")
    train(paths, short, SHORT, args.iters, 3e-3, 16)
    rows = [("trained at 64", short, 1, perplexities(paths, short, args.eval_tokens))]
    rows.append(("same, PI x4 at evaluation only", short, FACTOR,
                 perplexities(paths, short, args.eval_tokens, ["--rotary-seq-len-interpolation-factor", str(FACTOR)])))
    train(paths, extended, LONG, args.pi_iters, 1e-3, 4,
          ["--load", short, "--finetune", "--rotary-seq-len-interpolation-factor", str(FACTOR)])
    rows.append((f"+ {args.pi_iters} steps at 256 with PI x4", extended, FACTOR,
                 perplexities(paths, extended, args.eval_tokens)))

    from tasks.results import markdown_table

    table = markdown_table(["model", "PI factor"] + [f"ppl @ {n}" for n in EVAL_LENGTHS],
                           [[name, factor] + [f"{ppl[n]:.2f}" for n in EVAL_LENGTHS] for name, _, factor, ppl in rows])
    print(f"held-out perplexity, sliding window (stride 32), {args.eval_tokens} tokens per length; "
          f"{time.time() - start:.0f} s in all\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
