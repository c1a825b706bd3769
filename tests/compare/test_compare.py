"""kvlab compare on tiny models: artifacts, resume, JSONL data, shared prefill, errors."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare_helpers import AttentionPolicy
from tiny import save_tiny_model, tiny_model

from kvpress_lab.cli.main import main
from kvpress_lab.compare import compare, parse_keeps, parse_lengths, plan_policies
from kvpress_lab.compare.report import PLOTS, write_plots, write_summary
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.shared import can_share_prefill, run_shared
from kvpress_lab.errors import InputError, UnknownPolicyError
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTH = 600  # characters = tokens of the tiny char tokenizer
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model directory usable as ``--model``."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")


def _run(lm, registry, out, policies=("test_attention", "test_attention:block_size=300"), **kw):
    args = dict(
        tasks=["niah"],
        lengths=[LENGTH],
        keeps=[0.5, 0.25],
        samples=2,
        lm=lm,
        out=out,
        registry=registry,
        max_new_tokens=3,
        progress=False,
    )
    args.update(kw)
    return compare(list(policies), **args)


def test_end_to_end_writes_every_artifact(lm, test_registry, tmp_path):
    res = _run(lm, test_registry, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    # 2 samples x (1 full + 2 specs x 2 keeps)
    assert len(rows) == 2 * (1 + 2 * 2) == res.ran == len(res.rows)
    full = [r for r in rows if r["spec"] == "full"]
    assert len(full) == 2 and all(r["keep_ratio"] is None for r in full)
    for r in rows:
        for field in (
            "params", "task", "sample_id", "target_length", "prompt_tokens", "prediction",
            "references", "score", "kept_tokens", "target_tokens", "kv_bytes_full",
            "kv_bytes_kept", "peak_kv_bytes", "prefill_s", "compress_s", "decode_s",
            "decode_tokens_per_s", "shared_prefill", "protocol", "seed", "probe_s",
            "decode_compressions", "decode_peak_kv_tokens",
        ):  # fmt: skip
            assert field in r, field
        assert r["probe_s"] == 0.0 and r["decode_compressions"] == 0  # no probe, no decode option
        assert r["protocol"] == "question-aware" and r["seed"] == 0
        assert r["prompt_tokens"] == pytest.approx(LENGTH, rel=0.03)
        if r["spec"] != "full":
            assert r["target_tokens"] == int(r["keep_ratio"] * r["prompt_tokens"])
            assert r["kept_tokens"] == r["target_tokens"]
            assert r["params"]["keep_ratio"] == r["keep_ratio"]
    one_shot = [r for r in rows if r["spec"] in ("full", "test_attention")]
    blockwise = [r for r in rows if r["spec"] == "test_attention:block_size=300"]
    assert all(r["shared_prefill"] for r in one_shot)
    assert not any(r["shared_prefill"] for r in blockwise)
    assert all(r["blocks"] == -(-r["prompt_tokens"] // 300) for r in blockwise)

    with (tmp_path / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 1 + 2 * 2
    for s in summary:
        assert s["n"] == "2" and s["fair"] == "True"
        assert float(s["full_accuracy"]) == pytest.approx(sum(r["score"] for r in full) / len(full))
    md = (tmp_path / "summary.md").read_text()
    assert "| `test_attention:block_size=300` | niah | 600 | 0.25 | 2 |" in md
    assert "every policy kept its target token count within 1%" in md

    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["model"] == "tiny-llama" and meta["seed"] == 0
    assert meta["protocol"] == "question-aware" and meta["device"] == "cpu"
    assert meta["versions"]["torch"] == importlib.metadata.version("torch")
    assert {"torch", "transformers", "kvpress-lab", "accelerate"} <= set(meta["versions"])
    assert any(p["distribution"] == "kvpress-lab" for p in meta["plugins"])
    resolved = {(p["spec"], p["keep_ratio"]): p for p in meta["resolved_policies"]}
    assert resolved[("test_attention", 0.25)]["params"]["sinks"] == 2
    assert resolved[("full", None)]["distribution"] == "kvpress-lab"
    assert meta["command"]
    for name in PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_resume_runs_only_missing_rows(lm, test_registry, tmp_path, monkeypatch):
    import kvpress_lab.compare.runner as runner

    real_row, made = runner._row, []

    def interrupt_after_three(*args, **kwargs):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(1)
        return real_row(*args, **kwargs)

    monkeypatch.setattr(runner, "_row", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        _run(lm, test_registry, tmp_path)
    first = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(first) == 3
    monkeypatch.setattr(runner, "_row", real_row)

    seen = []
    res = _run(lm, test_registry, tmp_path, on_row=lambda r: seen.append(r["key"]))
    assert res.ran == 10 - 3 and len(res.rows) == 10
    done_before = {json.loads(x)["key"] for x in first}
    assert not done_before & set(seen)
    assert len({r["key"] for r in res.rows}) == 10
    # nothing left: a third run computes nothing
    assert _run(lm, test_registry, tmp_path).ran == 0


def test_resume_refuses_other_model_or_seed(lm, test_registry, tmp_path):
    _run(lm, test_registry, tmp_path, samples=1, keeps=[0.5])
    with pytest.raises(InputError, match="seed=0.*seed=1"):
        _run(lm, test_registry, tmp_path, samples=1, keeps=[0.5], seed=1)
    other = tiny_model("qwen2", layers=2)
    with pytest.raises(InputError, match="model='tiny-llama'.*model='tiny-qwen2'"):
        _run(other, test_registry, tmp_path, samples=1, keeps=[0.5])
    with pytest.raises(InputError, match="protocol"):
        _run(lm, test_registry, tmp_path, samples=1, keeps=[0.5], query_agnostic=True)


def test_jsonl_user_data(lm, test_registry, tmp_path):
    data = tmp_path / "mine.jsonl"
    lines = [
        {
            "id": f"q{i}",
            "context": "The grass is green. " * 20
            + f"The code is {i}{i}{i}. "
            + "Here we go. " * 10,
            "question": "What is the code?",
            "answers": [f"{i}{i}{i}"],
            "answer_prefix": "The code is",
        }
        for i in range(3)
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = _run(
        lm, test_registry, tmp_path / "out", tasks=[str(data)], lengths=[600], samples=2,
        keeps=[0.5], policies=["test_attention"],
    )  # fmt: skip
    assert len(res.rows) == 2 * 2
    assert {r["sample_id"] for r in res.rows} == {"q0", "q1"}
    assert {tuple(r["references"]) for r in res.rows} == {("000",), ("111",)}
    assert all(r["task"] == str(data) for r in res.rows)


@pytest.mark.parametrize("query_agnostic", [False, True])
def test_shared_prefill_equals_independent_runs(lm, query_agnostic):
    text = "The grass is green. The sky is blue. " * 12 + "The pass key is 4242. " + "Ho. " * 20
    segments = build_prompt(lm.tokenizer, text, "What is the pass key?", "The pass key is")
    policies = [
        load_policy("full"),
        AttentionPolicy(keep_ratio=0.3),
        AttentionPolicy(keep_ratio=0.1, sinks=0),
        AttentionPolicy(keep_ratio=0.5, position_mode="contiguous"),
        load_policy("random", keep_ratio=0.2),
        AttentionPolicy(keep_ratio=0.3, block_size=4096),  # one block: shares too
    ]
    assert all(can_share_prefill(p.compose(), segments.context_length) for p in policies)
    shared = list(
        run_shared(lm, policies, segments, query_agnostic=query_agnostic, max_new_tokens=5)
    )
    assert len(shared) == len(policies)
    kept = set()
    for policy, got in zip(policies, shared, strict=True):
        want = run_segments(lm, policy, segments, query_agnostic=query_agnostic, max_new_tokens=5)
        assert torch.equal(got.kept_indices, want.kept_indices), policy
        assert got.answer_token_ids == want.answer_token_ids, policy
        assert got.kv_bytes_kept == want.kv_bytes_kept
        assert got.peak_kv_bytes == want.peak_kv_bytes
        kept.add(tuple(got.kept_indices.flatten().tolist()))
    assert len(kept) == len(policies) - 1  # the policies really differ (same budget: 3 and 6)
    # block-wise policies are refused
    blockwise = AttentionPolicy(keep_ratio=0.3, block_size=64)
    assert not can_share_prefill(blockwise.compose(), segments.context_length)
    with pytest.raises(ValueError, match="block-wise"):
        list(run_shared(lm, [blockwise], segments))


def test_compare_rows_equal_without_shared_prefill(lm, test_registry, tmp_path):
    a = _run(lm, test_registry, tmp_path / "a", samples=1, policies=["test_attention", "random"])
    b = _run(
        lm, test_registry, tmp_path / "b", samples=1, policies=["test_attention", "random"],
        share_prefill=False,
    )  # fmt: skip
    fields = ("key", "prediction", "kept_tokens", "kv_bytes_kept", "score")
    assert [[r[f] for f in fields] for r in a.rows] == [[r[f] for f in fields] for r in b.rows]
    assert all(r["shared_prefill"] for r in a.rows)
    assert not any(r["shared_prefill"] for r in b.rows)


def test_plan_policies_keep_override_and_spec_wins(test_registry):
    entries = plan_policies(
        ["test_attention", "random:keep_ratio=0.3", "full", "test_attention:budget=50"],
        [0.5, 0.25],
        test_registry,
    )
    got = [(e.spec, e.keep, e.policy.keep_ratio, e.policy.budget) for e in entries]
    assert got == [
        ("full", None, 1.0, None),
        ("test_attention", 0.5, 0.5, None),
        ("test_attention", 0.25, 0.25, None),
        ("random:keep_ratio=0.3", 0.3, 0.3, None),
        ("test_attention:budget=50", None, 0.5, 50),
    ]


def test_load_policy_skips_overrides_a_policy_cannot_take():
    assert load_policy("full", keep_ratio=0.25).keep_ratio == 1.0
    assert load_policy("random", keep_ratio=0.25, no_such_field=3).keep_ratio == 0.25
    assert load_policy(load_policy("full"), keep_ratio=0.25).keep_ratio == 1.0


def test_parse_lengths_and_keeps():
    assert parse_lengths("1k,2k,500,1.5k") == [1024, 2048, 500, 1536]
    assert parse_keeps("0.5,0.25,1") == [0.5, 0.25, 1.0]
    for bad in ("1x", "0", "", "1k,,2k", "-5", "0.3k"):
        with pytest.raises(InputError):
            parse_lengths(bad)
    for bad in ("0", "1.5", "-0.1", "half"):
        with pytest.raises(InputError, match="--keep"):
            parse_keeps(bad)


def test_unknown_policy_fails_before_any_model_work(tmp_path):
    with pytest.raises(UnknownPolicyError, match="snapkvv"):
        compare(["snapkvv"], out=tmp_path / "x", model="/nonexistent/model", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nosuchpolicy"], "unknown policy 'nosuchpolicy'"),
        (["--policies", "random", "--lengths", "1k,two"], "--lengths: 'two' is not a length"),
        (["--policies", "random", "--lengths", "0"], "--lengths"),
        (["--policies", "random", "--keep", "0.5,1.5"], "--keep: '1.5' is outside (0, 1]"),
        (["--policies", "random", "--keep", "0"], "--keep: '0' is outside (0, 1]"),
        (["--policies", "random:keep_ratio=2"], "keep_ratio=2.0 is invalid"),
        (["--policies", "random", "--tasks", "niah,nosuchtask"], "unknown task 'nosuchtask'"),
        (["--policies", "random", "--tasks", "missing.jsonl"], "task file missing.jsonl does not"),
    ],
)
def test_cli_bad_inputs_one_line_exit_2(args, message, capsys, tmp_path):
    # every check runs before the model loads: the model path does not even exist
    model = ["--model", str(tmp_path / "no-model")]
    code = main(["compare", *args, *model, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kvlab: error:")
    assert message in err


def test_cli_end_to_end_and_policy_list_parsing(tmp_path, capsys, saved_model):
    model = saved_model
    out = tmp_path / "o"
    argv = [
        "compare", "--policies", "random:seed=3,granularity=layer,random", "--lengths", "600",
        "--keep", "0.5", "--samples", "1", "--model", str(model), "--out", str(out),
        "--max-new-tokens", "2", "--no-progress", "--html-sample", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["spec"] for r in rows) == ["full", "random", "random:seed=3,granularity=layer"]
    # one retention page per policy (full included) for the chosen sample, plus an index
    pages = sorted(p.name for p in (out / "retention" / "niah-600-keep0.5-s0").glob("*.html"))
    assert len(pages) == 4 and "index.html" in pages
    index = (out / "retention" / "niah-600-keep0.5-s0" / "index.html").read_text()
    for spec in ("full", "random", "random:seed=3,granularity=layer"):
        assert spec in index
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["arguments"].startswith(
        "kvlab compare --policies random:seed=3,granularity=layer,random --tasks niah"
    )
    assert "--keep 0.5 --samples 1" in meta["arguments"]
    assert "| `random` | niah | 600 | 0.5 | 1 |" in capsys.readouterr().out


def _sharded_cli(model, out, nproc):
    """`accelerate launch` with ``nproc`` CPU processes (1 = a plain run)."""
    args = [
        "--policies", "random", "--lengths", "600", "--keep", "0.5,0.25", "--samples", "2",
        "--model", str(model), "--out", str(out), "--max-new-tokens", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "kvpress_lab.cli.main", "compare", *args]
    else:
        cmd = [
            str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes",
            str(nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "-m", "kvpress_lab.cli.main", "compare", *args,
        ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_two_processes_produce_the_rows_of_one(tmp_path, saved_model):
    model = saved_model
    one = _sharded_cli(model, tmp_path / "one", 1)
    two = _sharded_cli(model, tmp_path / "two", 2)
    assert len(one) == 2 * (1 + 2)
    fields = ("key", "spec", "sample_id", "prediction", "kept_tokens", "score", "kv_bytes_kept")
    assert [[r[f] for f in fields] for r in one] == [[r[f] for f in fields] for r in two]
    assert not (tmp_path / "two" / "shards").exists()  # merged by the main process
    assert (tmp_path / "two" / "summary.md").exists()


def test_manual_shards_then_merge(lm, test_registry, tmp_path):
    kw = dict(samples=3, keeps=[0.5], policies=["test_attention"])
    a = _run(lm, test_registry, tmp_path, shard=(0, 2), **kw)
    b = _run(lm, test_registry, tmp_path, shard=(1, 2), **kw)
    assert a.summary == [] and b.summary == []
    assert a.ran == 2 * 2 and b.ran == 1 * 2  # samples 0, 2 | sample 1
    assert not (tmp_path / "results.jsonl").exists()
    merged = _run(lm, test_registry, tmp_path, **kw)
    assert merged.ran == 0 and len(merged.rows) == 6
    assert (tmp_path / "summary.md").exists() and not (tmp_path / "shards").exists()
    single = _run(lm, test_registry, tmp_path / "single", **kw)
    assert [r["prediction"] for r in single.rows] == [r["prediction"] for r in merged.rows]


def test_summary_flags_unfair_budgets_and_plots_budget_specs(tmp_path):
    def row(spec, keep, kept, target, score):
        return {
            "spec": spec, "task": "niah", "target_length": 1000, "keep_ratio": keep,
            "score": score, "kept_tokens": kept, "target_tokens": target,
            "kv_bytes_kept": kept * 10, "kv_bytes_full": 10_000, "peak_kv_bytes": 12_000,
            "prefill_s": 1.0, "compress_s": 0.1, "decode_s": 0.5, "decode_tokens_per_s": 20.0,
            "shared_prefill": True,
        }  # fmt: skip

    rows = [
        row("full", None, 1000, 1000, 1.0),
        row("a", 0.25, 250, 250, 1.0),
        row("b", 0.25, 253, 250, 0.0),  # 1.2 % over its target
        row("c:budget=100", None, 100, 100, 0.0),
    ]
    summary = write_summary(tmp_path, rows, {"model": "m", "command": "kvlab compare"})
    fair = {s["policy"]: s["fair"] for s in summary}
    assert fair == {"full": True, "a": True, "b": False, "c:budget=100": True}
    md = (tmp_path / "summary.md").read_text()
    assert "## Fairness warnings" in md
    assert (
        "`b` on niah at 1000 tokens, keep 0.25: kept 253.0 tokens against a target of 250.0" in md
    )
    assert "`a` on niah" not in md.split("## Fairness warnings")[1]
    for path in write_plots(tmp_path, summary):
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_shared_prefill_equals_independent_runs_for_every_registered_policy(lm):
    """Every installed policy that runs one-shot on this context shares the prefill exactly."""
    from kvpress_lab.registry import default_registry

    text = "The grass is green. The sky is blue. " * 12 + "The pass key is 4242. " + "Ho. " * 20
    segments = build_prompt(lm.tokenizer, text, "What is the pass key?", "The pass key is")
    policies = [load_policy(name, keep_ratio=0.25) for name in default_registry().names("policy")]
    sharers = [p for p in policies if can_share_prefill(p.compose(), segments.context_length)]
    assert {"full", "random"} <= {p.name for p in sharers}
    shared = list(run_shared(lm, sharers, segments, max_new_tokens=4))
    for policy, got in zip(sharers, shared, strict=True):
        want = run_segments(lm, policy, segments, max_new_tokens=4)
        assert torch.equal(got.kept_indices, want.kept_indices), policy.name
        assert got.answer_token_ids == want.answer_token_ids, policy.name


def test_one_policy_at_two_keep_ratios_observes_and_probes_once(lm, monkeypatch):
    """Equal scorer settings share one observer and one run of the probe passes, and each
    keep ratio still selects exactly what an independent run of it selects."""
    from kvlab_plugins.h2o import H2OScorer
    from kvlab_plugins.kvzip import KVzipScorer

    text = "The grass is green. The sky is blue. " * 12 + "The pass key is 4242. " + "Ho. " * 20
    segments = build_prompt(lm.tokenizer, text, "What is the pass key?", "The pass key is")
    policies = [
        load_policy(spec)
        for spec in ("kvzip:keep_ratio=0.3", "h2o:keep_ratio=0.3", "kvzip:keep_ratio=0.1")
    ] + [load_policy("h2o:keep_ratio=0.1"), load_policy("kvzip:keep_ratio=0.1,n_sink=2")]
    probes, observed = [], []
    real_probes, real_observe = KVzipScorer.probes, H2OScorer.observe
    monkeypatch.setattr(
        KVzipScorer, "probes", lambda self, *a: probes.append(1) or real_probes(self, *a)
    )
    monkeypatch.setattr(
        H2OScorer, "observe", lambda self, obs: observed.append(1) or real_observe(self, obs)
    )
    shared = list(run_shared(lm, policies, segments, max_new_tokens=4))
    n_layers = lm.model.config.num_hidden_layers
    assert len(probes) == 2  # kvzip n_sink=4 (both keeps) once, n_sink=2 once
    assert len(observed) == n_layers  # h2o's two keep ratios: one observer
    monkeypatch.setattr(KVzipScorer, "probes", real_probes)
    monkeypatch.setattr(H2OScorer, "observe", real_observe)
    kept = set()
    for policy, got in zip(policies, shared, strict=True):
        want = run_segments(lm, policy, segments, max_new_tokens=4)
        assert torch.equal(got.kept_indices, want.kept_indices), policy
        assert got.answer_token_ids == want.answer_token_ids, policy
        if policy.name == "kvzip":  # the probe's peak is reported for the twin too
            assert got.peak_kv_bytes == want.peak_kv_bytes, policy
            assert got.probe_s > 0, policy
        assert got.compress_s > 0, policy  # the shared scoring counts for every policy
        kept.add(tuple(got.kept_indices.flatten().tolist()))
    assert len(kept) == len(policies)
