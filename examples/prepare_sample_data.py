"""Prepare the quickstart's data offline: a real English corpus (the Python
language reference that ships with Python), a Llama-style sentencepiece
tokenizer trained on it, and the indexed .bin/.idx dataset the driver reads.

    python examples/prepare_sample_data.py --out runs/quickstart
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.training.data.sample_corpus import train_sample_tokenizer, write_sample_corpus  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    corpus = os.path.join(args.out, "corpus.jsonl")
    n_docs = write_sample_corpus(corpus)
    print(f"corpus: {n_docs} documents, {os.path.getsize(corpus) / 1e6:.2f} MB -> {corpus}")

    model = train_sample_tokenizer(corpus, os.path.join(args.out, "tokenizer"), vocab_size=args.vocab_size)
    print(f"tokenizer: sentencepiece BPE, {args.vocab_size} pieces -> {model}")

    prefix = os.path.join(args.out, "corpus")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
                    "--output-prefix", prefix, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model,
                    "--append-eod", "--workers", "2"], check=True)
    print(f"dataset: {prefix}_text_document.bin/.idx")


if __name__ == "__main__":
    main()
