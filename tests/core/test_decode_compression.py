"""Generation-time compression (``decode_interval`` / ``decode_budget`` on any policy).

The reference for the generated tokens is independent of the engine: the whole sequence
(context, question, generated tokens) in ONE forward pass of the plain transformers model, with a
4-D attention mask in which every generated token's row sees exactly the slots the cache held when
it was fed. Which slots those are is simulated here in plain Python from the policy's rule
(sinks + most recent, or a hand-written score), so the test checks the eviction schedule, the
positions (original, never moved) and the selection together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import ClassVar

import attrs
import pytest
import torch
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from tiny import tiny_model

from kvpress_lab.cli.main import main
from kvpress_lab.engine.api import run
from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import Allocation, Budgeter, Scorer, StepLayout
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import describe_parameters, load_policy

CONTEXT = "the quick brown fox jumps over the lazy dog; "  # 45 chars
QUESTION = "why?"


class _SeenRows(Scorer):
    """Prefers sequence indices divisible by 3, then later ones; records what it observed."""

    name: ClassVar[str] = "seen_rows_test"

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int], int, int]] = []

    def observe(self, obs):
        if obs.layer_idx == 0 and obs.layout.n_question == 0:  # decode steps only
            rows = obs.observation_rows()
            self.seen.append(
                (obs.n_past, obs.positions.tolist(), rows.stop - rows.start, obs.keys.shape[2])
            )
        return None

    def score(self, layout, observed, candidates, cache_keys):
        ci = layout.context_index[:1, :1].to(torch.float32)
        return (ci % 3 == 0).to(torch.float32) + ci * 1e-4


@attrs.define(kw_only=True)
class _EveryThirdPolicy(Policy):
    name: ClassVar[str] = "every_third_test"
    observation_window: int = 5
    scorer: _SeenRows = attrs.field(factory=_SeenRows, repr=False)

    def compose(self) -> Composition:
        from kvpress_lab.policy import EngineOptions

        return Composition(
            budgeter=SinkWindowBudgeter(keep_ratio=self.keep_ratio, budget=self.budget),
            scorers={"main": self.scorer},
            selector=TopKSelector(scorer="main", granularity="global"),
            engine=EngineOptions(observation_window=self.observation_window),
        )


class _ProtectFirst(Budgeter):
    """Protects the first 30 slots whatever the budget (to exercise the protection check)."""

    name: ClassVar[str] = "protect_first_test"

    def __init__(self, budget: int | None) -> None:
        self.budget = budget

    def target_tokens(self, context_length: int) -> int:
        return min(context_length, self.budget or context_length)

    def allocate(self, layout: StepLayout) -> Allocation:
        slots = torch.arange(layout.n_slots).expand(1, 1, layout.n_slots)
        protected = slots < 30
        keep = self.target_tokens(layout.context_length)
        return Allocation(protected=protected, candidates=~protected, k=max(0, keep - 30))


@attrs.define(kw_only=True)
class _ProtectFirstPolicy(Policy):
    name: ClassVar[str] = "protect_first_test"

    def compose(self) -> Composition:
        from kvlab_plugins.recency import RecencySelector

        return Composition(budgeter=_ProtectFirst(self.budget), selector=RecencySelector())


def _masked_reference(lm, tokens: list[int], visible: dict[int, list[int]], n_prompt: int):
    """Greedy tokens after each row of ``tokens`` from one masked forward pass.

    Rows before ``n_prompt`` see the causal prefix; row ``s`` from there on sees ``visible[s]``
    (the cached slots, by sequence index) and itself.
    """
    S = len(tokens)
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    for s, seen in visible.items():
        mask[s] = False
        mask[s, seen] = True
        mask[s, s] = True
    with torch.no_grad():
        logits = lm.model(
            torch.tensor([tokens]),
            attention_mask=mask[None, None],
            position_ids=torch.arange(S)[None],
        ).logits[0]
    return logits[n_prompt - 1 :].argmax(-1).tolist()


@attrs.frozen
class _Schedule:
    visible: dict[int, list[int]]  # generated row -> sequence indices it sees
    peak: int  # most slots held
    compressions: list[tuple[int, int]]  # (last row fed, slots held) at every compression


def _simulate(
    n_prompt: int,
    n_generated: int,
    interval: int,
    budget: int,
    keep: Callable[[list[int]], list[int]],
) -> _Schedule:
    """Which sequence indices each generated row sees, from the policy's rule."""
    cache = list(range(n_prompt))
    visible, peak, pending, compressions = {}, len(cache), 0, []
    for s in range(n_prompt, n_prompt + n_generated - 1):  # the last token is never fed
        visible[s] = list(cache)
        cache.append(s)
        peak = max(peak, len(cache))
        pending += 1
        if pending == interval:
            pending = 0
            if len(cache) > budget:
                compressions.append((s, len(cache)))
                cache = sorted(keep(cache))
                assert len(cache) == budget
    return _Schedule(visible, peak, compressions)


def _check_against_reference(lm, result, interval, budget, keep) -> _Schedule:
    prompt = result.context_token_ids + result.question_token_ids
    generated = result.answer_token_ids
    assert len(generated) > 3 * interval  # the schedule was exercised
    plan = _simulate(len(prompt), len(generated), interval, budget, keep)
    expected = _masked_reference(lm, prompt + generated[:-1], plan.visible, len(prompt))
    assert generated == expected
    assert result.decode_peak_kv_tokens == plan.peak == budget + interval
    assert result.decode_compressions == len(plan.compressions) >= 3
    return plan


@pytest.mark.parametrize("query_agnostic", [False, True])
def test_sinks_and_recent_window_equal_masked_reference(query_agnostic):
    """StreamingLLM's rule (4 sinks + most recent) applied every 8 generated tokens."""
    lm = tiny_model("llama", seed=0)
    interval, budget = 8, 64
    result = run(
        lm,
        f"streamingllm:keep_ratio=1,rerotate=false,decode_interval={interval},decode_budget={budget}",
        CONTEXT,
        QUESTION,
        max_new_tokens=80,
        chat_template=False,
        query_agnostic=query_agnostic,
    )
    _check_against_reference(lm, result, interval, budget, lambda c: c[:4] + c[-(budget - 4) :])


def test_scorer_observes_the_generated_rows_and_decides_what_stays():
    lm = tiny_model("qwen2", seed=1)
    policy = _EveryThirdPolicy(keep_ratio=1.0, decode_interval=6, decode_budget=58)
    result = run(lm, policy, CONTEXT, QUESTION, max_new_tokens=60, chat_template=False)

    def keep(cache):  # top-58 by (index % 3 == 0, then later index)
        return sorted(cache, key=lambda s: (s % 3 == 0, s), reverse=True)[:58]

    plan = _check_against_reference(lm, result, 6, 58, keep)
    # every compression observed the 6 rows generated since the last one, at their original
    # positions, over the whole cache; query-based scorers read the trailing window of 5
    assert policy.scorer.seen == [
        (held - 6, list(range(last - 5, last + 1)), 5, held) for last, held in plan.compressions
    ]


@pytest.mark.parametrize(("spec", "n_tokens"), [("snapkv", 1000), ("h2o", 300), ("tova", 300)])
def test_peak_never_exceeds_budget_plus_interval(spec, n_tokens, monkeypatch):
    lm = tiny_model("llama", seed=3)
    # no end-of-turn token: the answer runs to exactly n_tokens
    monkeypatch.setattr("kvpress_lab.engine.api.stop_token_ids", lambda model, tok: set())
    interval, budget = 32, 96
    result = run(
        lm,
        f"{spec}:keep_ratio=0.5,decode_interval={interval},decode_budget={budget}",
        CONTEXT * 2,
        QUESTION,
        max_new_tokens=n_tokens,
        chat_template=False,
    )
    assert len(result.answer_token_ids) == n_tokens
    assert result.decode_peak_kv_tokens == budget + interval
    # 45 kept + 7 question = 52 slots; interval ends at 84 (kept), 116 (compressed), then
    # every 32 fed tokens from 96 to 128: (n_tokens - 1) // 32 - 1 compressions
    assert result.decode_compressions == (n_tokens - 1) // interval - 1
    held = result.kept_tokens + len(result.question_token_ids)
    plan = _simulate(int(held), n_tokens, interval, budget, lambda c: c[:budget])
    assert result.decode_compressions == len(plan.compressions)
    assert result.to_dict(indices=False)["decode_compressions"] == result.decode_compressions


def test_budget_holding_everything_equals_plain_generation(monkeypatch):
    lm = tiny_model("mistral", seed=4)
    monkeypatch.setattr("kvpress_lab.engine.api.stop_token_ids", lambda model, tok: set())
    plain = run(lm, "snapkv:keep_ratio=0.5", CONTEXT, QUESTION, max_new_tokens=80)
    roomy = run(
        lm,
        "snapkv:keep_ratio=0.5,decode_interval=16,decode_budget=500",
        CONTEXT,
        QUESTION,
        max_new_tokens=80,
    )
    assert roomy.answer_token_ids == plain.answer_token_ids
    assert roomy.decode_compressions == 0
    assert roomy.decode_peak_kv_tokens == plain.decode_peak_kv_tokens
    assert plain.decode_peak_kv_tokens == (
        plain.kept_tokens + len(plain.question_token_ids) + len(plain.answer_token_ids) - 1
    )


def test_options_are_listed_and_set_from_spec_strings():
    registry = default_registry()
    for name in registry.names("policy"):
        params = {p[0]: p for p in describe_parameters(registry.policy_class(name))}
        assert params["decode_interval"] == ("decode_interval", "int | None", None), name
        assert params["decode_budget"] == ("decode_budget", "int | None", None), name
    policy = load_policy("snapkv:keep_ratio=0.25,decode_interval=64,decode_budget=512")
    assert (policy.decode_interval, policy.decode_budget) == (64, 512)
    assert policy.params()["decode_budget"] == 512


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "snapkv:decode_interval=8",
            "decode_interval=8 and decode_budget=None: generation-time compression needs both",
        ),
        ("snapkv:decode_interval=0,decode_budget=8", "decode_interval=0 is invalid"),
        (
            "snapkv:keep_ratio=0.5,decode_interval=8,decode_budget=20",
            r"decode_budget=20 is smaller than the cache when decoding starts: 23 kept context "
            r"tokens \+ 7 question tokens = 30; raise decode_budget to at least 30",
        ),
        (
            "full:decode_interval=8,decode_budget=100",
            "full: decode_budget=100 cannot be enforced: full takes no budget",
        ),
        (
            "h2o:decode_eviction=true,decode_interval=8,decode_budget=100",
            "cannot be combined with the policy's own decode-time eviction",
        ),
    ],
)
def test_invalid_settings_name_value_and_fix(spec, message):
    lm = tiny_model("llama")
    with pytest.raises(ConfigError, match=message):
        run(lm, spec, CONTEXT, QUESTION, max_new_tokens=4, chat_template=False)


def test_budget_below_what_the_policy_protects_is_refused():
    lm = tiny_model("llama")
    policy = _ProtectFirstPolicy(budget=40, decode_interval=8, decode_budget=20)
    with pytest.raises(ConfigError, match="smaller than the cache when decoding starts"):
        run(lm, policy, CONTEXT, QUESTION, max_new_tokens=4, chat_template=False)
    policy = _ProtectFirstPolicy(budget=20, decode_interval=8, decode_budget=28)
    with pytest.raises(
        ConfigError,
        match=r"decode_budget=28 is smaller than the 30 tokens the policy protects in a decode "
        r"step of 36 tokens; raise decode_budget to at least 30",
    ):
        run(lm, policy, "x" * 10, QUESTION, max_new_tokens=4, chat_template=False)


def test_cli_run_records_decode_compressions(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "context.txt"
    path.write_text(CONTEXT * 2)
    spec = "tova:keep_ratio=0.5,decode_interval=16,decode_budget=80"
    code = main(
        ["run", "--model", str(tiny_model_dir), "--policy", spec, "--context-file", str(path)]
        + ["--question", QUESTION, "--max-new-tokens", "200", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["policy"]["decode_interval"] == 16 and data["policy"]["decode_budget"] == 80
    assert data["decode_peak_kv_tokens"] <= 96
    assert data["decode_compressions"] >= 1


def test_every_token_schedule_like_h2o_real_drop(monkeypatch):
    """``decode_interval=1``: H2O's schedule (evict one slot per token, cache held at C + 1)."""
    lm = tiny_model("qwen3", seed=5)
    monkeypatch.setattr("kvpress_lab.engine.api.stop_token_ids", lambda model, tok: set())
    result = run(
        lm,
        "h2o:keep_ratio=0.5,decode_interval=1,decode_budget=30",
        CONTEXT,
        QUESTION,
        max_new_tokens=40,
        chat_template=False,
    )
    held = int(result.kept_tokens) + len(result.question_token_ids)  # 23 + 7 = 30
    assert held == 30
    assert result.decode_peak_kv_tokens == 31
    assert result.decode_compressions == 39  # every fed token


class _Probing(_SeenRows):
    name: ClassVar[str] = "probing_test"

    def probes(self, layout, context_ids, tokenizer):
        return ()


def test_scorers_with_probe_passes_are_refused():
    @attrs.define(kw_only=True)
    class _ProbingPolicy(_EveryThirdPolicy):
        name: ClassVar[str] = "probing_test"
        scorer: _SeenRows = attrs.field(factory=_Probing, repr=False)

    lm = tiny_model("llama")
    policy = _ProbingPolicy(keep_ratio=0.5, decode_interval=8, decode_budget=100)
    with pytest.raises(
        ConfigError,
        match=r"probing_test: decode_interval=8,decode_budget=100 cannot run the probe passes "
        r"of scorer\(s\) \['main'\]",
    ):
        run(lm, policy, CONTEXT, QUESTION, max_new_tokens=4, chat_template=False)


def test_shared_prefill_answers_like_independent_runs():
    """``kvlab compare`` shares one prefill between policies; decode compression still applies."""
    from kvpress_lab.engine.api import run_segments
    from kvpress_lab.engine.shared import run_shared
    from kvpress_lab.prompt import build_prompt

    lm = tiny_model("llama", seed=6)
    segments = build_prompt(lm.tokenizer, CONTEXT * 2, QUESTION, chat_template=False)
    policies = [
        load_policy("snapkv:keep_ratio=0.5,decode_interval=8,decode_budget=60"),
        load_policy("tova:keep_ratio=0.25,decode_interval=4,decode_budget=40"),
    ]
    shared = list(run_shared(lm, policies, segments, max_new_tokens=60))
    for policy, got in zip(policies, shared, strict=True):
        want = run_segments(lm, policy, segments, max_new_tokens=60)
        assert got.answer_token_ids == want.answer_token_ids
        assert got.decode_compressions == want.decode_compressions > 0
        assert got.decode_peak_kv_tokens == want.decode_peak_kv_tokens
