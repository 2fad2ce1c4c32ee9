"""The transformers teacher and the generation loop: provenance of every
output, batched left-padded generation equal to one prompt at a time,
filters, bounded retries and failures that are never dropped."""

import dataclasses
import json
import os

import pytest

from megatron.training.distill.filters import FilterConfig, reject_reason, repetition_ratio
from megatron.training.distill.generate import prompt_seed
from megatron.training.distill.output_dir import OutputDirError
from megatron.training.distill.teacher import Generation
from tests.distill.conftest import N_DOCS, SAMPLING, manifest_ids, read_shards, run_generation

ELIGIBLE = [f"doc{i}" for i in range(N_DOCS)]  # the two short documents give no prompt


def test_outputs_carry_their_provenance(corpus, generated, hf_teacher):
    out, report = generated
    records = read_shards(out)
    assert [r["id"] for r in records] == ELIGIBLE[:len(records)] and report.kept == len(records) == N_DOCS
    assert report.skipped == {"short_document": 2}
    tok = hf_teacher.tokenizer
    for r, text in zip(records, corpus[1]):
        assert r["prefix"] == tok.decode(tok(text, add_special_tokens=False).input_ids[:16])
        assert r["text"] == r["prefix"] + r["continuation"] and r["continuation"]
        assert 4 <= r["continuation_tokens"] <= SAMPLING["max_new_tokens"] and r["prefix_tokens"] == 16
        assert r["teacher"] == "tiny-llama" and r["backend"] == "hf" and r["source"] == corpus[0]
        assert r["sampling"] == dict(SAMPLING, top_p=1.0, seed=prompt_seed(SAMPLING["seed"], r["id"]))
    assert report.generated_tokens == sum(r["continuation_tokens"] for r in records)
    totals = json.load(open(os.path.join(out, "report.json")))
    assert totals["documents"] == N_DOCS and totals["still_failed"] == []


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(hf_teacher):
    greedy = dataclasses.replace(hf_teacher.sampling, temperature=0.0, max_new_tokens=12)
    saved, hf_teacher.sampling = hf_teacher.sampling, greedy
    try:
        tok = hf_teacher.tokenizer
        prompts = [tok("x = 1", add_special_tokens=False).input_ids,
                   tok("The while statement is used for repeated execution", add_special_tokens=False).input_ids]
        batched = hf_teacher.generate(prompts, [0, 0])
        single = [hf_teacher.generate([p], [0])[0] for p in prompts]
    finally:
        hf_teacher.sampling = saved
    assert len(prompts[0]) != len(prompts[1])  # so the first one is padded
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_repetition_ratio():
    assert repetition_ratio([1, 2, 3] * 10) > 0.8
    assert repetition_ratio(list(range(30))) == 0.0
    cfg = FilterConfig(min_tokens=4, max_repetition=0.5)
    assert reject_reason("  \n", [1, 2, 3, 4, 5], cfg) == "empty"
    assert reject_reason("ab", [1, 2], cfg) == "too_short"
    assert reject_reason("x", [7, 8, 9] * 8, cfg) == "repetitive"
    assert reject_reason("x", list(range(10)), cfg) is None


class PlantingTeacher:
    """The HF teacher, with planted outputs for some prompts (by their first token after BOS)."""

    def __init__(self, inner, planted):
        self.inner, self.planted = inner, planted
        self.sampling, self.backend, self.tokenizer = inner.sampling, inner.backend, inner.tokenizer

    def generate(self, prompts, seeds):
        real = self.inner.generate(prompts, seeds)
        return [self.planted.get(tuple(p), g) for p, g in zip(prompts, real)]


def _prompt_ids(teacher, text, n=16):
    return (teacher.tokenizer.bos_token_id, *teacher.tokenizer(text, add_special_tokens=False).input_ids[:n])


def test_filters_drop_planted_degenerate_outputs(corpus, hf_teacher, tmp_path):
    space = hf_teacher.tokenizer(" ", add_special_tokens=False).input_ids
    plants = {2: Generation([], "eos"), 5: Generation(space * 8, "eos"), 9: Generation([40, 41], "eos"),
              13: Generation([40, 41, 42] * 8, "length")}
    planted = {_prompt_ids(hf_teacher, corpus[1][i]): g for i, g in plants.items()}
    report = run_generation(corpus[0], PlantingTeacher(hf_teacher, planted), tmp_path)
    kept = {r["id"] for r in read_shards(tmp_path)}
    assert kept == set(ELIGIBLE) - {f"doc{i}" for i in plants}
    assert report.filtered == {"empty": 2, "too_short": 1, "repetitive": 1}
    assert sorted(manifest_ids(tmp_path)) == sorted(ELIGIBLE)  # filtered documents count as done
    assert json.load(open(tmp_path / "report.json"))["filtered"] == report.filtered


class FlakyTeacher:
    """Raises for some prompts: {prompt ids: how many calls fail (None: all)}."""

    def __init__(self, inner, failures):
        self.inner, self.failures, self.calls = inner, failures, {}
        self.sampling, self.backend, self.tokenizer = inner.sampling, inner.backend, inner.tokenizer

    def generate(self, prompts, seeds):
        for p in map(tuple, prompts):
            if p in self.failures:
                self.calls[p] = self.calls.get(p, 0) + 1
                if self.failures[p] is None or self.calls[p] <= self.failures[p]:
                    raise RuntimeError("CUDA out of memory (injected)")
        return self.inner.generate(prompts, seeds)


def test_failed_prompt_is_retried_then_logged_and_rerun(corpus, hf_teacher, tmp_path):
    flaky = _prompt_ids(hf_teacher, corpus[1][3])  # fails in its batch and on the first retry
    broken = _prompt_ids(hf_teacher, corpus[1][10])  # fails every time
    teacher = FlakyTeacher(hf_teacher, {flaky: 2, broken: None})
    logs = []
    report = run_generation(corpus[0], teacher, tmp_path, log=logs.append, max_retries=2)
    assert teacher.calls[broken] == 3  # the batch, then two retries: bounded
    assert teacher.calls[flaky] == 3
    assert report.failed == 1 and report.still_failed == 1
    assert "doc3" in {r["id"] for r in read_shards(tmp_path)}
    failed = [json.loads(line) for line in open(tmp_path / "failed.jsonl")]
    assert [(f["id"], f["attempts"]) for f in failed] == [("doc10", 3)] and "injected" in failed[0]["error"]
    assert "doc10" not in manifest_ids(tmp_path) and any("doc10" in m for m in logs)

    again = run_generation(corpus[0], hf_teacher, tmp_path)  # the next run retries it
    assert again.handled == 1 and again.still_failed == 0 and again.already_done == N_DOCS - 1
    assert sorted(manifest_ids(tmp_path)) == sorted(ELIGIBLE)


def test_resuming_with_other_sampling_settings_is_refused(corpus, hf_teacher, generated):
    out, _ = generated
    other = dataclasses.replace(hf_teacher.sampling, temperature=0.3)
    saved, hf_teacher.sampling = hf_teacher.sampling, other
    try:
        with pytest.raises(OutputDirError, match="new --output-dir"):
            run_generation(corpus[0], hf_teacher, out)
    finally:
        hf_teacher.sampling = saved
