"""Prepare the BERT workflow's data offline: a masked-LM corpus (the Python
language reference plus unlabeled sentences of a planted financial-news-like
task), a lower-case WordPiece vocab.txt trained on it, the sentence-split
indexed dataset pretrain_bert.py reads, and the labelled classification
files (training as {"text", "label"}, held-out in FinGPT's instruction format).

    python examples/prepare_bert_sample.py --out runs/bert
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.training.data.sample_corpus import (  # noqa: E402
    planted_classification_records, train_sample_wordpiece, write_bert_sample_corpus, write_planted_classification,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bert", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--planted-documents", type=int, default=500, help="domain documents of 6 sentences")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--valid-examples", type=int, default=500)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    corpus = os.path.join(args.out, "corpus.jsonl")
    n_docs = write_bert_sample_corpus(corpus, args.planted_documents, reference_every=1)
    print(f"corpus: {n_docs} documents, {os.path.getsize(corpus) / 1e6:.2f} MB -> {corpus}")
    vocab = train_sample_wordpiece(corpus, args.out, vocab_size=args.vocab_size)
    print(f"vocabulary: WordPiece, {args.vocab_size} pieces -> {vocab}")

    prefix = os.path.join(args.out, "corpus")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
                    "--output-prefix", prefix, "--split-sentences", "--tokenizer-type", "BertWordPieceLowerCase",
                    "--vocab-file", vocab, "--workers", "2"], check=True)
    print(f"dataset: {prefix}_text_sentence.bin/.idx")

    train = write_planted_classification(os.path.join(args.out, "train.jsonl"), args.train_examples, seed=1)
    valid = os.path.join(args.out, "valid_fingpt.jsonl")
    with open(valid, "w", encoding="utf-8") as f:
        for r in planted_classification_records(args.valid_examples, seed=2):
            f.write(json.dumps({"instruction": "What is the sentiment of this news? "
                                               "Please choose an answer from {negative/neutral/positive}.",
                                "input": r["text"], "output": r["label"]}) + "\n")
    print(f"classification: {args.train_examples} training examples -> {train}; "
          f"{args.valid_examples} held-out (FinGPT format) -> {valid}")


if __name__ == "__main__":
    main()
