"""Score a held-out classification file with an exported Hugging Face
*ForSequenceClassification (its own tokenizer, transformers only): accuracy
and macro-F1, as finetune_classification.py reports them.

    python examples/score_hf_classifier.py --model runs/bert/classifier-hf --data runs/bert/valid_fingpt.jsonl
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.classification import metrics
    from tasks.sequence_classification import read_files

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported HF classifier directory")
    parser.add_argument("--data", nargs="+", required=True, help="jsonl file(s) of labelled records")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    records = read_files(args.data)
    predicted = []
    for i in range(0, len(records), args.batch_size):
        batch = records[i:i + args.batch_size]
        pairs = [r.text_b for r in batch] if batch[0].text_b is not None else None
        inputs = tokenizer([r.text for r in batch], pairs, padding=True, truncation=True, max_length=args.max_length,
                           return_tensors="pt")
        with torch.no_grad():
            predicted += [model.config.id2label[int(k)] for k in model(**inputs).logits.argmax(-1)]
    result = metrics([r.label for r in records], predicted)
    print(f"{type(model).__name__} on {len(records)} examples: accuracy {100 * result['accuracy']:.2f}%, "
          f"macro-F1 {100 * result['macro_f1']:.2f}%")


if __name__ == "__main__":
    main()
