"""Several questions over one context: compress once and answer many (query-agnostic), one
prefill per question (question-aware), the prefill counter, and the summary's per-sample score."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from tiny import tiny_model

from kvpress_lab.compare import compare
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.questions import answer_questions
from kvpress_lab.errors import InputError
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy

FILLER = "The committee met again and the minutes were read aloud without objection. "
QUESTIONS = [
    {"question": "Where does Ada live?", "answer": "Lisbon"},
    {"question": "What is the access code?", "answers": ["4417"], "answer_prefix": "Code:"},
    {"question": "Who moved?", "answers": ["Ada"]},
]
# one-shot, block-wise with small blocks, an observation-window scorer, a decode-time evictor
# (H2O's), probe passes of their own (KVzip's context reconstruction), and generation-time
# compression (the second question's answer outgrows decode_budget and is compressed twice)
POLICIES = [
    "knorm:keep_ratio=0.5,decode_interval=2,decode_budget=280",
    "full",
    "knorm:keep_ratio=0.5",
    "snapkv:keep_ratio=0.4",
    "laserkv:keep_ratio=0.5,block_size=96",
    "streamingllm:keep_ratio=0.3",
    "h2o:keep_ratio=0.5,decode_eviction=True",
    "kvzip:keep_ratio=0.5,chunk_size=128",
]

SWEEP = ("knorm", "snapkv", "laserkv:block_size=96")  # two one-shot, one block-wise


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2, seed=5)  # a seed whose answers differ by question


def _context(k: int) -> str:
    return FILLER * 3 + f"Ada moved to Lisbon. The access code is 44{k}7. " + FILLER * 3


@contextmanager
def count_prefills(lm):
    """Counts the model's forward passes that start at position 0 (a prefill's first block;
    feeding a question or a decoded token never starts there)."""
    seen = [0]

    def hook(module, args, kwargs):
        if int(kwargs["position_ids"][0, 0]) == 0:
            seen[0] += 1

    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("spec", POLICIES)
def test_compress_once_answers_equal_separate_query_agnostic_runs(lm, spec):
    policy = load_policy(spec)
    prompts = [
        build_prompt(lm.tokenizer, _context(1), q["question"], q.get("answer_prefix", ""))
        for q in QUESTIONS
    ]
    with count_prefills(lm) as seen:
        answers = answer_questions(lm, policy, prompts, max_new_tokens=6)
    assert answers.prefills == seen[0] == 1
    with count_prefills(lm) as seen:
        alone = [
            run_segments(lm, policy, p, query_agnostic=True, max_new_tokens=6) for p in prompts
        ]
    assert seen[0] == len(prompts)
    for got, want in zip(answers.results, alone, strict=True):
        assert got.answer_token_ids == want.answer_token_ids
        assert got.kept_indices.equal(want.kept_indices)
        assert got.protocol == "query-agnostic"
    if "decode_budget" in spec:
        assert [r.decode_compressions for r in alone] == [0, 2, 0]
    # the questions really differ: a cache leaking one question into the next would show
    assert len({tuple(r.answer_token_ids) for r in alone}) > 1


def test_questions_of_one_call_must_share_their_context(lm):
    a = build_prompt(lm.tokenizer, _context(1), "Who?")
    b = build_prompt(lm.tokenizer, _context(2) + " More.", "Who?")
    with pytest.raises(InputError, match="question 1's prompt has another context segment"):
        answer_questions(lm, load_policy("knorm:keep_ratio=0.5"), [a, b])


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sweep(lm, tmp_path, name, records, query_agnostic):
    out = tmp_path / name
    res = compare(
        list(SWEEP),
        tasks=[_write(tmp_path / f"{name}.jsonl", records)],
        lengths=[600],
        keeps=[0.5],
        samples=10,
        lm=lm,
        out=out,
        query_agnostic=query_agnostic,
        max_new_tokens=5,
        progress=False,
    )
    return res


def _multi(n: int) -> list[dict]:
    return [{"context": _context(k), "questions": QUESTIONS, "id": f"c{k}"} for k in range(n)]


def _single(n: int) -> list[dict]:
    """The same questions, each a line (a sample) of its own."""
    out = []
    for k in range(n):
        for i, q in enumerate(QUESTIONS):
            answers = q.get("answers") or [q["answer"]]
            extra = {"answer_prefix": q["answer_prefix"]} if "answer_prefix" in q else {}
            out.append(
                {"context": _context(k), "question": q["question"], "answers": answers,
                 "id": f"c{k}#{i}", **extra}
            )  # fmt: skip
    return out


@pytest.mark.parametrize("query_agnostic", [True, False], ids=["query-agnostic", "question-aware"])
def test_compare_answers_every_question_as_its_own_run_would(lm, tmp_path, query_agnostic):
    with count_prefills(lm) as seen:
        multi = _sweep(lm, tmp_path, "multi", _multi(2), query_agnostic)
    single = _sweep(lm, tmp_path, "single", _single(2), query_agnostic)
    rows = multi.rows
    specs = {r["spec"] for r in rows}
    assert specs == {"full", *SWEEP}
    assert len(rows) == len(single.rows) == 2 * len(QUESTIONS) * len(specs)
    want = {(r["spec"], r["sample_id"]): r for r in single.rows}
    for r in rows:
        other = want[(r["spec"], f"{r['sample_id']}#{r['question_index']}")]
        assert r["prediction"] == other["prediction"]
        assert r["references"] == other["references"]
        assert r["score"] == other["score"]
        assert r["questions"] == len(QUESTIONS)
        assert r["protocol"] == ("query-agnostic" if query_agnostic else "question-aware")
    if query_agnostic:
        # one prefill per policy and context, counted on the first question's row
        for r in rows:
            assert r["prefills"] == (1 if r["question_index"] == 0 else 0)
            assert r["questions_per_prefill"] == len(QUESTIONS) and not r["shared_prefill"]
        assert sum(r["prefills"] for r in rows) == seen[0] == 2 * len(specs)
    else:
        # the question is part of the prefill: one per question, one-shot policies sharing it
        assert all(r["prefills"] == 1 and r["questions_per_prefill"] == 1 for r in rows)
        blockwise = sum(r["blocks"] > 1 for r in rows)
        assert blockwise == 2 * len(QUESTIONS)  # laserkv, alone
        assert seen[0] == 2 * len(QUESTIONS) * 2  # one shared + one laserkv prefill per question
    # the summary: n counts contexts, a sample scores the mean over its questions
    for line in multi.summary:
        assert line["n"] == 2 and line["questions"] == 2 * len(QUESTIONS)
        cell = [r for r in rows if r["spec"] == line["policy"]]
        means = [
            sum(r["score"] for r in cell if r["sample_id"] == s) / len(QUESTIONS)
            for s in ("c0", "c1")
        ]
        assert line["accuracy"] == pytest.approx(sum(means) / 2)
        per_sample = 1 if query_agnostic else len(QUESTIONS)
        assert line["prefills_per_sample"] == per_sample
    md = (multi.out / "summary.md").read_text()
    assert f"| 2 ({2 * len(QUESTIONS)} q) |" in md


def test_resume_runs_only_the_missing_questions(lm, tmp_path):
    first = _sweep(lm, tmp_path, "multi", _multi(2), True)
    lines = (first.out / "results.jsonl").read_text().splitlines()
    dropped = [json.loads(x) for x in lines[-2:]]
    (first.out / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    again = _sweep(lm, tmp_path, "multi", _multi(2), True)
    assert again.ran == 2
    keys = [r["key"] for r in again.rows]
    assert len(keys) == len(set(keys)) == len(lines)
    redone = {r["key"]: r for r in again.rows}
    for r in dropped:
        assert redone[r["key"]]["prediction"] == r["prediction"]


def test_a_failing_plugin_fails_every_question_of_its_context_and_a_rerun_retries_them(
    lm, tmp_path
):
    from test_compare_robustness import ExplodingScorer, _registry_with_exploding

    # contexts one token apart: the exploding scorer fails on the even one only
    records = [
        {"context": _context(0), "questions": QUESTIONS, "id": "c0"},
        {"context": _context(1) + "!", "questions": QUESTIONS, "id": "c1"},
    ]
    path = _write(tmp_path / "odd-even.jsonl", records)

    def run():
        return compare(
            ["test_exploding"], tasks=[path], lengths=[600], keeps=[0.5], samples=2, lm=lm,
            out=tmp_path / "out", registry=_registry_with_exploding(), query_agnostic=True,
            max_new_tokens=3, progress=False,
        )  # fmt: skip

    res = run()
    assert len(res.rows) == 2 * 2 * len(QUESTIONS)
    failed = sorted((r["sample_id"], r["question_index"]) for r in res.failed)
    assert len(failed) == len(QUESTIONS) and [q for _, q in failed] == [0, 1, 2]
    (bad,) = {s for s, _ in failed}
    assert all("raised ZeroDivisionError: even contexts" in r["error"] for r in res.failed)
    good = [r for r in res.rows if not r.get("failed") and r["spec"] == "test_exploding"]
    assert {r["sample_id"] for r in good} == {"c0", "c1"} - {bad}
    assert all(r["prompt_tokens"] % 2 == 1 for r in good)  # the odd context survived
    ExplodingScorer.fixed = True
    try:
        again = run()
    finally:
        ExplodingScorer.fixed = False
    assert again.ran == len(QUESTIONS) and again.failed == []
    fixed = [r for r in again.rows if r["sample_id"] == bad and r["spec"] == "test_exploding"]
    assert sorted(r["prefills"] for r in fixed) == [0, 0, 1]
