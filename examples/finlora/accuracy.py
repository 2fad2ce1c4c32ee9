"""Held-out accuracy of a model on the FinLoRA-style sentiment example: the
share of test prompts whose greedy answer is exactly the label, then EOS; and
the forced choice among the labels (which label's first token scores highest
where the answer starts), whose chance level is one in three.

    python examples/finlora/accuracy.py --model finetune_output/sentiment_tiny_r8/hf          # merged export
    python examples/finlora/accuracy.py --model examples/finlora/base \\
        --adapter finetune_output/sentiment_tiny_r8/adapter                                 # base + peft adapter
    python examples/finlora/accuracy.py --model examples/finlora/base                          # the base alone

Prompts are rendered with the tokenizer's chat template (Llama 2's [INST] format), as
finetune.py trained them; transformers runs the model in fp32 (peft applies an adapter).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load_model(model_dir: str, adapter_dir=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def accuracy(model, tokenizer_dir: str, records):
    """(exact, forced choice) over `records` ({"context", "target"}): the share whose greedy answer is
    exactly the target's tokens then EOS, and the share where the target's first token scores
    highest among the labels' (chance: 1 / number of labels)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    labels = sorted({r["target"] for r in records})
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    exact = chosen = 0
    for record in records:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["context"]}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
        expected = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(expected), do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, output_scores=True,
                                 return_dict_in_generate=True)
        exact += out.sequences[0, len(prompt):].tolist() == expected
        chosen += labels[int(out.scores[0][0, label_ids].argmax())] == record["target"]
    return exact / len(records), chosen / len(records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="an HF model directory (the base, or a merged export)")
    p.add_argument("--adapter", default=None, help="a peft adapter directory to apply to --model")
    p.add_argument("--data", default=os.path.join(HERE, "data", "sentiment_test.jsonl"))
    p.add_argument("--tokenizer", default=os.path.join(HERE, "base"), help="default: the example's tokenizer")
    args = p.parse_args(argv)
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    exact, chosen = accuracy(load_model(args.model, args.adapter), args.tokenizer, records)
    labels = len({r["target"] for r in records})
    print(f"held-out accuracy on {len(records)} prompts of {args.data}: exact answer {exact:.3f}, "
          f"forced choice among the {labels} labels {chosen:.3f} (chance {1 / labels:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
