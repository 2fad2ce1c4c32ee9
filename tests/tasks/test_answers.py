"""tasks/answers.py: task accuracy of greedy answers, on a planted model
whose greedy answers are known in advance (a rule, not a network: it
answers the word after "is" in the user's text, adds "news" when the text
says "verbose", then ends the turn), over records in FinLoRA's format, a
preference pair and a malformed line; with the SFT tools' own tokenizer and
chat template, so the prompts are the training data's."""

import json

import torch

from tasks.answers import EXTRA_TOKENS, normalise_answer, read_examples, summary
from tasks.answers import evaluate as answer_all
from tasks.generation import generate, greedy_batch
from tasks.lm import LanguageModel
from tasks.results import PartialResults
from tests.sft.conftest import make_word_tokenizer, write_jsonl

WORDS = "verbose : the sentiment of acme is positive negative neutral news".split()


class RuleModel(LanguageModel):
    """Greedy answers by rule: after the last <|assistant|>, the word after "is", then
    "news" if the prompt holds "verbose", then <|end|>."""

    def __init__(self, vocab):
        self.vocab, self.vocab_size = vocab, len(vocab)
        self.calls = 0

    def _next(self, prefix):
        v = self.vocab
        if v["<|assistant|>"] not in prefix:
            return v["<unk>"]
        start = len(prefix) - prefix[::-1].index(v["<|assistant|>"])
        prompt, said = prefix[:start], prefix[start:]
        answer = [prompt[prompt.index(v["is"]) + 1]] + ([v["news"]] if v["verbose"] in prompt else [])
        return (answer + [v["<|end|>"]])[min(len(said), len(answer))]

    def _logits(self, tokens):
        self.calls += 1
        out = torch.zeros(*tokens.shape, self.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                out[b, t, self._next(row[: t + 1])] = 10.0
        return out


def test_normalisation():
    assert normalise_answer("  Positive. ") == "positive"
    assert normalise_answer("\uff30ositive!") == "positive"  # NFKC: a full-width P
    assert normalise_answer("net\n  income") == "net income"
    assert normalise_answer('"1,234.5"') == "1,234.5"  # inner punctuation stays


def test_planted_answers_give_the_known_accuracy(tmp_path):
    from megatron.training.data.sft_templates import SFTEncoder
    from megatron.training.tokenizer import build_tokenizer

    path, vocab = make_word_tokenizer(tmp_path / "tok", WORDS)
    encoder = SFTEncoder(build_tokenizer("HuggingFaceTokenizer", path, legacy=False))  # its own chat template
    data = write_jsonl(tmp_path / "valid.jsonl", [
        {"context": "the sentiment of acme is positive", "target": "positive"},  # exact
        {"context": "the sentiment of acme is negative", "target": "Negative."},  # exact after normalisation
        {"context": "verbose : the sentiment of acme is positive", "target": "positive"},  # contains only
        {"context": "the sentiment of acme is neutral", "target": "positive"},  # wrong
        {"prompt": "the sentiment of acme is negative", "chosen": "negative", "rejected": "positive"},  # chosen
        "not json",
    ])
    examples, problems = read_examples([data])
    assert len(examples) == 5 and problems == [f"{data}:6: not a JSON object (Expecting value: line 1 column 1 "
                                               "(char 0))"]
    lm = RuleModel(vocab)
    results = PartialResults(str(tmp_path / "answers.partial.jsonl"), {"task": "answers"})
    answer_all(lm, encoder, examples, results, None, 0, batch_size=2)
    records = [results.records[e.key] for e in examples]
    assert [r["answer"] for r in records] == ["positive", "negative", "positive news", "neutral", "negative"]
    assert all(r["stopped"] for r in records)  # each ended its turn with <|end|>
    result = summary(examples, results)
    assert (result["exact_count"], result["contains_count"], result["examples"]) == (3, 4, 5)
    assert result["exact_match"] == 0.6 and result["contains"] == 0.8
    assert result["targets"]["positive"] == {"examples": 3, "exact": 1}

    # resuming: a second pass generates nothing
    calls = lm.calls
    answer_all(lm, encoder, examples, PartialResults(str(tmp_path / "answers.partial.jsonl"), {"task": "answers"}),
               None, 0, batch_size=2)
    assert lm.calls == calls
    with open(tmp_path / "answers.partial.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 6  # settings + 5 records

    # the batched greedy continuation is each prompt's own greedy continuation
    prompts = [encoder.encode_prompt(e.conversation) for e in examples]
    stops = [[vocab["<|end|>"]]] * len(prompts)
    budget = [2 + EXTRA_TOKENS] * len(prompts)
    assert greedy_batch(lm, prompts, budget, stops) == [generate(lm, p, budget[0], stop_ids=stops[0]) for p in prompts]
