"""--apply-chat-template (tasks/chat.py): an instruct model's prompts as one user turn of its
tokenizer's chat template, assistant turn opened, the answer scored after it. Checked on a tiny
random Llama with the tiny Llama 3.1 tokenizer and its chat template: each label's log-likelihood
is the one transformers gives for `apply_chat_template(tokenize=True, add_generation_prompt=True)`'s
ids followed by the answer's (no second <|begin_of_text|>, the system turn in place); without the
flag the plain prompt is scored; NER generates after the template; the misuses are one-line errors."""

import json

import pytest
import torch

from tests.family_tokenizers import make_llama3_tokenizer
from tests.tasks.test_family_tokenizers import _llama

SYSTEM = "Answer with one word."
EXAMPLES = [{"instruction": "What is the sentiment of this news?", "input": text, "output": label}
            for text, label in (("Profits rose sharply this quarter.", "positive"),
                                ("The company missed its targets.", "negative"),
                                ("Shares were flat on Monday.", "neutral"))]


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_llama3_tokenizer(str(tmp_path_factory.mktemp("instruct")))
    hf = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = _llama(len(hf)).eval()
    model.save_pretrained(path)
    data = tmp_path_factory.mktemp("fingpt") / "sentiment.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path, hf, model, str(data)


def _scores(path, data, out, *flags):
    """{(input, label): log-likelihood} from the run's partial results."""
    from tasks.main import build_parser, run

    result, _, _ = run(build_parser().parse_args(["--task", "fingpt", "--hf-model", path, "--data", data,
                                                  "--output", str(out), *flags]))
    labels = result["settings"]["labels"]["sentiment"]
    records = [json.loads(line) for line in open(str(out) + ".partial.jsonl")][1:]  # line 0: the settings
    by_index = {int(r["key"].split("/")[1]): r for r in records if "key" in r}
    return {(e["input"], label): by_index[i]["logprobs"][j]
            for i, e in enumerate(EXAMPLES) for j, label in enumerate(labels)}, result


def _template_ids(hf, messages):
    """transformers' own ids of the rendered conversation, the assistant turn opened."""
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in some versions


def _reference(hf, model, context_ids, answer):
    answer_ids = hf(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(context_ids)
    return float(sum(logprobs[n - 1 + k, t] for k, t in enumerate(answer_ids)))


def test_labels_are_scored_after_the_chat_templates_assistant_turn(instruct_model, tmp_path):
    path, hf, model, data = instruct_model
    chat, result = _scores(path, data, tmp_path / "chat", "--apply-chat-template", "--system-instruction", SYSTEM)
    assert result["settings"]["chat_template"] == {"system_instruction": SYSTEM}
    plain, _ = _scores(path, data, tmp_path / "plain")
    prompt = "Instruction: {instruction}\nInput: {input}\nAnswer:"  # tasks/templates/fingpt.json
    for (text, label), got in chat.items():
        example = next(e for e in EXAMPLES if e["input"] == text)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": prompt.format(**example)}]
        ids = _template_ids(hf, messages)
        assert ids[0] == hf.bos_token_id and ids[1] != hf.bos_token_id
        # fp32 forward of the same ids: ~1e-6 apart in a sum of a few log-probabilities
        assert got == pytest.approx(_reference(hf, model, ids, " " + label), abs=1e-4)
        plain_ids = [hf.bos_token_id] + hf(prompt.format(**example), add_special_tokens=False).input_ids
        assert plain[(text, label)] == pytest.approx(_reference(hf, model, plain_ids, " " + label), abs=1e-4)
        assert abs(got - plain[(text, label)]) > 1e-3  # the template changes what is scored


def test_chat_template_misuses_are_one_line_errors(instruct_model, tmp_path):
    from tasks.lm import EvalError
    from tasks.main import build_parser, run

    path, _, _, data = instruct_model
    base = ["--task", "fingpt", "--hf-model", path, "--data", data, "--output", str(tmp_path / "x")]
    with pytest.raises(EvalError, match="--system-instruction .* add --apply-chat-template"):
        run(build_parser().parse_args(base + ["--system-instruction", SYSTEM]))
    with pytest.raises(EvalError, match="--apply-chat-template applies to --task fineval, fingpt, ner"):
        run(build_parser().parse_args(["--task", "perplexity", "--hf-model", path, "--jsonl", data,
                                       "--apply-chat-template"]))
    no_template = make_llama3_tokenizer(str(tmp_path / "base"), chat_template=None)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    _llama(len(AutoTokenizer.from_pretrained(no_template))).save_pretrained(no_template)
    with pytest.raises(EvalError, match="has no chat template .* drop the flag for a base model"):
        run(build_parser().parse_args(["--task", "fingpt", "--hf-model", no_template, "--data", data,
                                       "--output", str(tmp_path / "y"), "--apply-chat-template"]))


def test_ner_generates_after_the_chat_template_with_an_hf_tokenizer(instruct_model, tmp_path):
    # NER prompts of HF tokenizers used to fail (tokenize() takes no bos=); with the template, the greedy
    # continuation is transformers' greedy continuation of apply_chat_template's ids.
    from tasks.main import build_parser, run

    path, hf, model, _ = instruct_model
    data = tmp_path / "ner.jsonl"
    rows = [{"instruction": "Extract the entities.", "input": "Tim Cook leads Apple Inc in Cupertino.",
             "output": "tim cook is a person, apple inc is an organization."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ner"
    run(build_parser().parse_args(["--task", "ner", "--hf-model", path, "--data", str(data), "--output", str(out),
                                   "--max-new-tokens", "5", "--apply-chat-template"]))
    (record,) = [r for r in map(json.loads, open(str(out) + ".partial.jsonl")) if "key" in r]
    prompt = "Instruction: {instruction}\nInput: {input}\nAnswer:".format(**rows[0])
    ids = _template_ids(hf, [{"role": "user", "content": prompt}])
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                             pad_token_id=hf.eos_token_id)[0, len(ids):].tolist()
    if hf.eos_token_id in new:
        new = new[:new.index(hf.eos_token_id)]
    assert record["generated"] == hf.decode(new)
