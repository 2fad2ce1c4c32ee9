"""tasks/multiple_choice.py, tasks/classification.py and tasks/ner.py: a planted benchmark
scores 100% and its shuffled twin near chance, few-shot prompts hold exactly
the requested dev examples, malformed rows are reported with file:line, an
interrupted run resumes, and a Megatron TP=2 checkpoint scores as its HF source."""

import os

import pytest

from tasks import classification, multiple_choice, ner
from tasks.lm import EvalError
from tasks.results import PartialResults
from tests.tasks.conftest import MC_TEMPLATE, NER_EXAMPLES, SUBJECTS, CountingLM, Interrupted, eval_args, hf_lm

QUESTIONS = sum(SUBJECTS.values())


def run_task(argv):
    from tasks.main import run

    return run(eval_args(argv))[0]


def fineval_argv(model_dir, sp_model, bench, out, *extra):
    return ["--task", "fineval", "--hf-model", model_dir, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
            sp_model, "--data-dir", bench, "--template", os.path.join(bench, "template.json"), "--output", out, *extra]


@pytest.mark.parametrize("scoring", ["letter", "text"])
def test_planted_fineval_scores_100_and_shuffled_near_chance(planted, sp_model, tmp_path, scoring):
    bench, shuffled, model_dir = planted
    result = run_task(fineval_argv(model_dir, sp_model, bench, str(tmp_path / "p"), "--scoring", scoring))
    assert result["average"] == 1.0 and result["questions"] == QUESTIONS
    assert all(s["accuracy"] == 1.0 for s in result["subjects"].values())
    assert os.path.isfile(tmp_path / "p.json") and "| **Average**" in open(tmp_path / "p.md").read()
    # Same questions, random key: chance is 25%; 50% is 3 standard deviations
    # above it for 20 questions (seeded, so the value itself is fixed).
    chance = run_task(fineval_argv(model_dir, sp_model, shuffled, str(tmp_path / "s"), "--scoring", scoring))
    assert chance["average"] <= 0.5


def instruction_task_argv(task, model_dir, sp_model):
    return ["--task", task, "--hf-model", model_dir, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_model]


def test_planted_fingpt_scores_100_and_shuffled_near_chance(planted, sp_model, tmp_path):
    bench, shuffled, model_dir = planted
    argv = instruction_task_argv("fingpt", model_dir, sp_model)
    result = run_task(argv + ["--data", os.path.join(bench, "sentiment.jsonl"), "--output", str(tmp_path / "p")])
    m = result["tasks"]["sentiment"]
    assert m["examples"] == 12 and m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    chance = run_task(argv + ["--data", os.path.join(shuffled, "sentiment.jsonl"), "--output", str(tmp_path / "s")])
    assert chance["tasks"]["sentiment"]["accuracy"] <= 2 / 3  # chance 1/3, 12 examples


def test_planted_ner_scores_100_and_swapped_types_score_0(planted, sp_model, tmp_path):
    bench, shuffled, model_dir = planted
    argv = instruction_task_argv("ner", model_dir, sp_model)
    result = run_task(argv + ["--data", os.path.join(bench, "ner.jsonl"), "--output", str(tmp_path / "p")])
    m = result["tasks"]["ner"]
    assert m["examples"] == NER_EXAMPLES and m["support"] == 2 * NER_EXAMPLES
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert m["types"]["organization"]["support"] == NER_EXAMPLES and m["types"]["location"]["f1"] == 1.0
    assert "| ner  | micro" in open(tmp_path / "p.md").read()
    # the model still names the right spans, but the gold types are swapped: nothing matches
    swapped = run_task(argv + ["--data", os.path.join(shuffled, "ner.jsonl"), "--output", str(tmp_path / "s")])
    assert swapped["tasks"]["ner"]["f1"] == 0.0 and swapped["tasks"]["ner"]["support"] == 2 * NER_EXAMPLES


def test_ner_spans_and_scores_against_hand_computed_values():
    text = "Shares of Acme Corp rose as Acme Corp hired Ann Lee in Paris."
    gold = ner.entity_spans(text, "acme corp is an organization, acme corp is an organization, "
                                  "ann lee is a person, paris. is a location.")
    # words: shares of acme corp rose as acme corp hired ann lee in paris.
    assert gold == {("organization", 2, 4), ("organization", 6, 8), ("person", 9, 11), ("location", 12, 13)}
    assert ner.entity_spans(text, "Acme Corp is an organization, bob is a person, paris. is a city.") == \
        {("organization", 2, 4)}  # bob is not in the text; city is not a scored type
    predicted = ner.entity_spans(text, "acme corp is a person, ann lee is a person, lee is a person")
    assert predicted == {("person", 2, 4), ("person", 9, 11)}  # lee's words are taken by ann lee
    m = ner.entity_metrics([gold], [predicted])
    # tp 1 (ann lee) of 2 predicted and 4 gold
    assert (m["precision"], m["recall"]) == (0.5, 0.25) and m["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert m["types"]["person"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["types"]["organization"]["recall"] == 0.0 and m["types"]["organization"]["support"] == 2


def test_macro_f1_against_hand_computed_values():
    m = classification.metrics(["pos", "pos", "neg", "neu"], ["pos", "neg", "neg", "pos"])
    # pos: P 1/2 R 1/2 F1 1/2; neg: P 1/2 R 1 F1 2/3; neu: 0
    assert m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


@pytest.mark.parametrize("shots", [0, 1, 3])
def test_few_shot_prompt_holds_exactly_the_requested_dev_examples(planted, shots):
    bench = planted[0]
    subjects, _ = multiple_choice.load_subjects(bench, "val", shots, ["accounting"])
    dev_all, _ = multiple_choice.read_fineval_csv(os.path.join(bench, "dev", "accounting_dev.csv"))
    template = multiple_choice.check_template(MC_TEMPLATE, multiple_choice.TEMPLATE_FIELDS, "t")
    question = subjects[0].questions[0]
    prompt = multiple_choice.build_prompt(template, "accounting", subjects[0].dev, question)
    for i, example in enumerate(dev_all):
        answered = example.question + "\n" + "\n".join(f"{k}. {v}" for k, v in example.options.items()) + \
            f"\nAnswer: {example.answer}\n\n"
        assert prompt.count(answered) == (1 if i < shots else 0)
    assert prompt.count("Answer:") == shots + 1 and prompt.endswith(question.options["D"] + "\nAnswer:")
    with pytest.raises(EvalError, match="fewer than --shots 4: use --shots 3"):
        multiple_choice.load_subjects(bench, "val", 4)


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "x_val.csv"
    path.write_text('id,question,A,B,C,D,answer,explanation\n'
                    '0,q0,a,b,c,d,A,"two\nlines"\n'       # lines 2-3
                    '1,q1,a,b,c,d,E,\n'                    # line 4: bad answer
                    '2,q2,a,b,c,A\n'                       # line 5: two fields short
                    '3,,a,b,c,d,B,\n'                      # line 6: empty question
                    '4,q4,a,b,c,d,C,\n', encoding="utf-8")
    questions, problems = multiple_choice.read_fineval_csv(str(path))
    assert [q.id for q in questions] == ["0", "4"] and questions[1].source == f"{path}:7"
    assert problems[0].startswith(f"{path}:4: answer 'E'")
    assert problems[1].startswith(f"{path}:5: 6 fields, the header has 8")
    assert problems[2].startswith(f"{path}:6: empty 'question'")
    with pytest.raises(EvalError, match="malformed rows"):
        multiple_choice.load_subjects(str(tmp_path), "val", 0, strict=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "i", "input": "x", "output": "positive"}\nnot json\n'
                   '{"instruction": "i", "input": "y"}\n{"instruction": "i", "input": "x", "output": "negative"}\n')
    examples, labels, problems = classification.read_fingpt_jsonl(str(bad))
    assert len(examples) == 2 and labels == ["negative", "positive"]
    assert problems[0].startswith(f"{bad}:2: not JSON") and problems[1].startswith(f"{bad}:3: needs string fields")


def test_interrupted_run_resumes_from_partial_results(planted, sp_model, tmp_path):
    bench, _, model_dir = planted
    lm = hf_lm(model_dir, sp_model)
    template = multiple_choice.check_template(MC_TEMPLATE, multiple_choice.TEMPLATE_FIELDS, "t")
    subjects, _ = multiple_choice.load_subjects(bench, "val", 0)
    settings = {"model": "planted", "shots": 0, "scoring": "letter"}
    path = str(tmp_path / "partial.jsonl")

    # 8 questions per step x 4 options = 8 forward passes of 4 per step: stop in the second step
    interrupted = CountingLM(lm, limit=9)
    with pytest.raises(Interrupted):
        multiple_choice.evaluate(interrupted, subjects, template, "letter", PartialResults(path, settings), 4)
    done = PartialResults(path, settings)
    assert len(done.records) == 8

    resumed = CountingLM(lm)
    results = PartialResults(path, settings)
    multiple_choice.evaluate(resumed, subjects, template, "letter", results, 4)
    assert resumed.calls == (QUESTIONS - 8) * 4 // 4  # only the rest was scored
    assert multiple_choice.report(subjects, results, [], settings)["average"] == 1.0
    with pytest.raises(EvalError, match="other settings \\(shots differ\\)"):
        PartialResults(path, dict(settings, shots=5))


def test_megatron_tp2_scores_as_its_hf_source(megatron_runs, planted, sp_model, tmp_path):
    bench, _, model_dir = planted
    hf = run_task(fineval_argv(model_dir, sp_model, bench, str(tmp_path / "hf")))
    mg = megatron_runs["fineval_tp2"]
    assert mg["average"] == hf["average"] == 1.0
    assert megatron_runs["fingpt_tp2"]["tasks"]["sentiment"]["accuracy"] == 1.0
    hf_records = PartialResults(str(tmp_path / "hf.partial.jsonl"), hf["settings"]).records
    mg_records = PartialResults(os.path.join(megatron_runs["out_dir"], "fineval.partial.jsonl"), mg["settings"]).records
    assert sorted(mg_records) == sorted(hf_records) and len(hf_records) == QUESTIONS
    for key, record in hf_records.items():
        # per-option log-likelihoods, fp32, TP=2 vs transformers
        assert mg_records[key]["logprobs"] == pytest.approx(record["logprobs"], abs=1e-4), key
