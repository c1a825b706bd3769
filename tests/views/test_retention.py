"""The token-retention page: marks, escaping, metadata, and the per-policy compare pages."""

from __future__ import annotations

import re

import attrs
import pytest
from view_helpers import hand_result as build_hand_result
from view_helpers import make_result

from kvpress_lab.testing import TinyTokenizer
from kvpress_lab.views import write_compare_pages, write_retention_html


@pytest.fixture
def hand_result():
    return build_hand_result()


SPAN = re.compile(
    r'<span class="tok ([a-z]+) s(\d+)[^"]*" data-i="(\d+)" data-kept="([0-9.]+)"[^>]*>([^<]*)</span>'
)


def spans(page: str):
    return [(m[2], m[0], int(m[1]), m[3], m[4]) for m in SPAN.findall(page)]


def test_every_token_marked_with_its_retention(tmp_path, hand_result):
    path = write_retention_html(
        hand_result, TinyTokenizer(), tmp_path / "sub" / "r.html", "Key?", "It is"
    )
    page = path.read_text()
    assert path == tmp_path / "sub" / "r.html"
    got = spans(page)
    assert [(i, state, kept, text) for i, state, _, kept, text in got] == [
        ("0", "kept", "1.00", "a"),
        ("1", "partial", "0.75", "b"),
        ("2", "partial", "0.25", "&lt;"),
        ("3", "partial", "0.50", "c"),
        ("4", "dropped", "0.00", "&gt;"),
        ("5", "dropped", "0.00", "d"),
        ("6", "partial", "0.50", "&amp;"),
        ("7", "kept", "1.00", "e"),
    ]
    assert [shade for _, _, shade, _, _ in got] == [10, 8, 2, 5, 0, 0, 5, 10]


def test_page_is_self_contained_and_shows_run(tmp_path, hand_result):
    page = write_retention_html(
        hand_result, TinyTokenizer(), tmp_path / "r.html", "Key <?>", "It is"
    ).read_text()
    assert "<style>" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no external assets
    assert "<script" not in page
    assert '<span id="question">Key &lt;?&gt;</span>' in page
    assert "<i>It is</i> 4721" in page
    assert '<b id="kept">4</b> of\n<b id="context-tokens">8</b>' in page
    assert "<td>window</td><td>2</td>" in page
    assert "2 layers &times; 2 KV heads" in page
    for label in ("kept by every layer and KV head", "kept by some", "dropped everywhere"):
        assert label in page


def test_special_tokens_shown_by_name(tmp_path):
    class Tok(TinyTokenizer):
        def convert_ids_to_tokens(self, tid):
            return {1: "<s>"}.get(tid)

    result = attrs.evolve(make_result("xy", [[[0, 1]]]), context_token_ids=[1, 3 + ord("y")])
    page = write_retention_html(result, Tok(), tmp_path / "r.html", "q").read_text()
    assert 'class="tok kept s10 special" data-i="0" data-kept="1.00"' in page
    assert ">&lt;s&gt;</span>" in page


def test_compare_pages_one_per_policy_and_index(tmp_path, hand_result):
    from kvpress_lab.tasks.base import Sample

    other = make_result("ab<c>d&e", [[[4, 5]]], answer="no idea")
    other = attrs.evolve(other, policy_name="other")
    sample = Sample(
        task="t",
        context="ab<c>d&e",
        question="Key?",
        answers=("4721",),
        answer_prefix="It is",
        sample_id="passkey-8-0-0",
    )
    paths = write_compare_pages(
        {"hand:keep_ratio=0.5": hand_result, "other": other},
        TinyTokenizer(),
        tmp_path / "pages",
        sample,
    )
    assert [p.name for p in paths] == [
        "index.html",
        "passkey-8-0-0__hand_keep_ratio=0.5.html",
        "passkey-8-0-0__other.html",
    ]
    index = paths[0].read_text()
    assert (
        '<a href="passkey-8-0-0__other.html">other</a></td><td>2 / 8</td><td>no idea</td>' in index
    )
    page = paths[2].read_text()
    assert [s[3] for s in spans(page)] == ["0.00"] * 4 + ["1.00"] * 2 + ["0.00"] * 2
    assert "<b>reference</b> 4721" in page
    # a plain list is labelled by policy name, duplicates kept apart
    paths = write_compare_pages([other, other], TinyTokenizer(), tmp_path / "p2", {"question": "q"})
    assert [p.name for p in paths] == ["index.html", "sample__other.html", "sample__other_2.html"]
