"""Build the small assets behind the FinLoRA-style examples of
finetune_configs.json (committed beside this script, so `python finetune.py
finlora_sentiment_tiny_<method>` runs on a fresh clone without downloading
anything):

    base/    a tiny Llama (LlamaForCausalLM, 2 layers, hidden 64, GQA), pretrained for a few hundred
             steps on news about the training companies, half of it followed by a comment saying
             whether the news is good (what a real base knows about finance; never the instruction
             or its format), and its word-level tokenizer, whose chat template is Llama 2's
             "[INST] ... [/INST]" (FinLoRA's prompt format)
    data/    sentiment_train.jsonl, sentiment_test.jsonl: financial headlines with FinLoRA's sentiment
             instruction in FinLoRA's record format, {"context": "What is the sentiment of this news? ...",
             "target": "positive"}

The task is planted: a headline is a company name and an event, and the event
alone decides the label. The base knows the events' sentiment from its
pretraining text but not the instruction: it answers the prompts at chance at
best. The test set's companies never occur in training (nor in pretraining),
so a model that answers them right has learned to follow the instruction, not
the companies. Deterministic: running it again writes the same files.

    python examples/finlora/make_assets.py [--out examples/finlora]
"""

import argparse
import itertools
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

INSTRUCTION = ("What is the sentiment of this news ? Please choose an answer from { negative / neutral / positive } "
               ". Text :")
EVENTS = {
    "positive": ["beats profit forecast", "raises full year guidance", "wins large defence contract",
                 "shares jump on record sales", "lifts dividend by ten percent", "reports strong loan growth",
                 "upgraded to buy by analysts", "expands margins for third quarter"],
    "negative": ["misses revenue estimates", "cuts full year guidance", "faces fraud probe by regulator",
                 "shares slump on weak demand", "suspends dividend payments", "reports rising loan losses",
                 "downgraded to sell by analysts", "warns of margin pressure"],
    "neutral": ["to hold annual meeting in may", "appoints new board member", "reports results in line",
                "moves headquarters to new office", "files quarterly report on time", "keeps dividend unchanged",
                "names new chief financial officer", "confirms date of investor day"],
}
SYLLABLES = ["al", "ber", "cor", "dan", "el", "fin", "gar", "hol", "ist", "jun", "kar", "lin", "mor", "nor"]
SUFFIXES = ["corp", "bank", "group", "holdings"]
TEST_COMPANIES = 24
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
# Llama 2's chat format: "[INST] question [/INST] answer </s>"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST] "
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }} </s> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{% endif %}")
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_SEQ, PRETRAIN_LR = 300, 32, 32, 3e-3
MODEL = dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)


def companies():
    names = [a + b + " " + s for (a, b), s in zip(itertools.permutations(SYLLABLES, 2), itertools.cycle(SUFFIXES))]
    random.Random(0).shuffle(names)
    return names[TEST_COMPANIES:], names[:TEST_COMPANIES]


def records(names, rng, per_company):
    out = []
    for name in names:
        for label in rng.sample(sorted(EVENTS) * per_company, per_company):
            out.append({"context": f"{INSTRUCTION} {name} {rng.choice(EVENTS[label])}", "target": label})
    rng.shuffle(out)
    return out


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_tokenizer(out_dir, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()} - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(SPECIALS) + len(words)


def pretraining_text(names, rng):
    """The base model's corpus: news about the training companies, half of it with a commentary that
    says whether the news is good (what a pretrained model knows about finance). Never the
    instruction, its [INST] format or a test company."""
    comments = ["analysts say the news is {} .", "the market took it as {} news .", "traders read it as {} ."]
    lines = []
    for name in names:
        for label, events in EVENTS.items():
            for event in events:
                comment = " " + rng.choice(comments).format(label) if rng.random() < 0.5 else ""
                lines.append(f"{name} {event} .{comment}")
    rng.shuffle(lines)
    return " </s> ".join(lines) + " </s>"  # documents end with EOS, as in any pretraining stream


def make_model(out_dir, text):
    """A tiny Llama pretrained briefly (next-token loss, Adam) on `text`, saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**dict(MODEL, vocab_size=len(tokenizer)), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // PRETRAIN_SEQ * PRETRAIN_SEQ].view(-1, PRETRAIN_SEQ)
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
    generator = torch.Generator().manual_seed(0)
    for step in range(PRETRAIN_STEPS):
        batch = windows[torch.randint(len(windows), (PRETRAIN_BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"pretrained the base {PRETRAIN_STEPS} steps on {ids.numel()} tokens: final loss {loss.item():.3f}")
    model.save_pretrained(out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default=HERE)
    args = p.parse_args(argv)
    train_names, test_names = companies()
    rng = random.Random(1234)
    train, test = records(train_names, rng, 6), records(test_names, rng, 3)
    write_jsonl(os.path.join(args.out, "data", "sentiment_train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "data", "sentiment_test.jsonl"), test)
    corpus = pretraining_text(train_names, rng)
    texts = [r["context"] + " " + r["target"] for r in train + test] + [corpus]
    vocab = make_tokenizer(os.path.join(args.out, "base"), texts)
    make_model(os.path.join(args.out, "base"), corpus)
    print(f"wrote {len(train)} training and {len(test)} test records, a {vocab}-word tokenizer and the base model "
          f"under {args.out}")


if __name__ == "__main__":
    main()
