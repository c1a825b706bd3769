"""GPU-ready hot paths: no host transfer in scorers, selectors and per-layer / per-token code.

On a GPU a ``.cpu()``, ``.item()``, ``.tolist()`` or ``bool(tensor)`` waits for every queued
kernel. The recorder (:mod:`kvpress_lab.testing.host_transfers`) catches those calls on CPU runs
too, so these tests fail on this CPU-only suite when one is put back into a hot path:

- ``Scorer.observe`` runs inside the forward pass, once per layer: no host read at all;
- ``Scorer.score`` and ``Selector.select`` run once per step: no tensor copied to the host
  (scores, top-k and index sets stay on the model's device);
- a whole compression step (budgeter, checks, selection, gathers, re-rotation) reads the host a
  constant number of times: the same count for a 2-layer/2-head and a 4-layer/4-head model
  (compressing after the forward pass; layer-wise compression inside the pass checks every
  layer's scores and selection, a constant number of reads per layer: tests/core/test_layerwise.py);
- decode-time eviction (H2O) copies nothing to the host per token.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

import kvpress_lab.engine.runner as runner
from kvpress_lab import build_prompt, load_policy, prefill_and_compress, run
from kvpress_lab.testing.host_transfers import HostTransferRecorder

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 5
QUESTION = "Which animal jumps?"

POLICIES = [
    "snapkv:keep_ratio=0.3,window=8",
    "h2o:keep_ratio=0.3",
    "finch:keep_ratio=0.3,block_size=96",
    "laserkv:keep_ratio=0.3,block_size=128",
    "laserkv:keep_ratio=0.3,block_size=128,alpha=0.5,redistribute=true",
    "streamingllm:keep_ratio=0.3,block_size=96",
    "knorm:keep_ratio=0.3",
    "tova:keep_ratio=0.3",
    "keydiff:keep_ratio=0.3",
    "expected_attention:keep_ratio=0.3",
]


def _sectioned(monkeypatch, rec: HostTransferRecorder, cls: type, method: str, label: str):
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        with rec.section(label):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


def _record(monkeypatch, spec: str, layerwise: bool = True, **model):
    """Prefill and compress under the recorder; sections for the plugins and the engine step."""
    lm = tiny_model("llama", seed=3, **model)
    comp = load_policy(spec).compose()
    rec = HostTransferRecorder()
    for scorer in comp.scorers.values():
        _sectioned(monkeypatch, rec, type(scorer), "observe", "observe")
        _sectioned(monkeypatch, rec, type(scorer), "score", "score")
    _sectioned(monkeypatch, rec, type(comp.selector), "select", "select")
    for name in ("plan_step", "compress_step"):
        original = getattr(runner, name)

        def step(*args, _original=original, **kwargs):
            with rec.section("step"):
                return _original(*args, **kwargs)

        monkeypatch.setattr(runner, name, step)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    with rec:
        state = prefill_and_compress(lm, comp, segments, layerwise=layerwise)
    monkeypatch.undo()
    return rec, state


@pytest.mark.parametrize("spec", POLICIES)
def test_no_host_transfer_in_scorers_and_selectors(monkeypatch, spec):
    rec, state = _record(monkeypatch, spec)
    assert state.kept_tokens < len(CONTEXT)  # something was compressed
    observe = rec.events_in("observe")
    assert not observe, f"host reads inside the forward pass (per layer):\n{rec.report(observe)}"
    for label in ("score", "select"):
        moved = rec.events_in(label, transfers_only=True)
        assert not moved, f"tensors copied to the host in {label}:\n{rec.report(moved)}"


@pytest.mark.parametrize("spec", POLICIES)
def test_host_reads_per_step_do_not_grow_with_layers_or_heads(monkeypatch, spec):
    small, s_state = _record(monkeypatch, spec, False, layers=2, heads=4, kv_heads=2)
    large, l_state = _record(monkeypatch, spec, False, layers=4, heads=8, kv_heads=4)
    assert s_state.blocks == l_state.blocks
    for label in ("step", "score", "select"):
        n_small, n_large = len(small.events_in(label)), len(large.events_in(label))
        assert n_small == n_large, (
            f"{label}: {n_small} host reads with 2 layers x 2 KV heads but {n_large} with 4 x 4; "
            f"they must not be per layer or per head. Large model:\n"
            f"{large.report(large.events_in(label))}"
        )


def test_h2o_decode_eviction_copies_nothing_to_the_host(monkeypatch):
    from kvlab_plugins.h2o import H2OEviction, h2o_keep

    lm = tiny_model("llama", seed=3)
    rec = HostTransferRecorder()
    _sectioned(monkeypatch, rec, H2OEviction, "after_forward", "evict")
    with rec:
        result = run(
            lm, "h2o:keep_ratio=0.3,decode_eviction=true", CONTEXT, QUESTION, max_new_tokens=6
        )
    assert result.kept_tokens > 0
    moved = rec.events_in("evict", transfers_only=True)
    assert not moved, f"per-token eviction copied tensors to the host:\n{rec.report(moved)}"
    assert not rec.events_in("evict"), rec.report(rec.events_in("evict"))
    keep = h2o_keep(torch.arange(10.0)[None], budget=4, recent=2)
    assert keep.tolist() == [[6, 7, 8, 9]]


def test_recorder_sees_every_kind_of_host_read():
    rec = HostTransferRecorder()
    t = torch.arange(6)
    with rec, rec.section("here"):
        t.cpu()
        t.tolist()
        t.numpy()
        bool((t > 2).any())
        int(t.sum())
        t[0].item()
    kinds = [e.kind for e in rec.events_in("here")]
    assert kinds == ["cpu", "tolist", "numpy", "scalar", "scalar", "scalar"]
    assert all(e.where.endswith(".py:" + e.where.rsplit(":", 1)[1]) for e in rec.events)
    assert "test_hot_path.py" in rec.events[0].where
    # the methods are restored afterwards
    assert "cpu" not in torch.Tensor.__dict__ and t.cpu() is t


def test_one_angle_table_per_step_gives_the_same_keys(monkeypatch):
    import kvpress_lab.ops.rope as rope_ops

    built = []
    original = rope_ops.angle_table
    monkeypatch.setattr(rope_ops, "angle_table", lambda *a: built.append(a) or original(*a))
    tables = rope_ops.AngleTables(40, "cpu")
    spec = type("Spec", (), {"inv_freq": 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16.0)})()
    keys = torch.randn(1, 2, 12, 16)
    old = torch.randint(0, 40, (2, 12))
    new = torch.arange(12)
    for _ in range(3):  # three layers sharing one rotary embedding
        out = rope_ops.rerotate_keys(keys, old, new, spec, angles=tables(spec))
        assert torch.equal(out, rope_ops.rerotate_keys(keys, old, new, spec))
    assert len(built) == 1


def test_lsh_scorer_hashes_each_vector_once(monkeypatch):
    import kvpress_lab.ops.lsh as lsh_ops

    rows = []
    original = lsh_ops.sign_bits
    monkeypatch.setattr(
        lsh_ops, "sign_bits", lambda x, p: rows.append(x.shape[0]) or original(x, p)
    )
    lm = tiny_model("llama", seed=3)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    comp = load_policy("laserkv:keep_ratio=0.3,alpha=0").compose()
    state = prefill_and_compress(lm, comp, segments)
    n_question = segments.question_length
    # one step: the candidates once and the question rows once
    assert len(rows) == 2 and rows[1] == n_question, rows
    assert rows[0] < segments.context_length and state.kept_tokens > 0
