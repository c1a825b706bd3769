"""Expected Attention: score keys by the attention future queries are expected to pay them.

Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution", 2025 (arXiv:2510.00636; NVIDIA kvpress ``ExpectedAttentionPress``).
Future queries are modelled as a Gaussian fitted to the prompt's queries before RoPE (mean ``mu``
and covariance ``S`` over the context rows after the first ``n_sink``), moved by the RoPE
rotation averaged over the next ``n_future_positions`` positions (``R = mean_t R_t``:
``mu <- R mu``, ``S <- R S R^T``). For a Gaussian query the expected logit of key ``k`` is
``s mu.k + s^2 k^T S k / 2`` (``s`` the attention scaling; the covariance term only with
``use_covariance``); its softmax over the context keys after the sinks, averaged over the query
heads that share a KV head, is each slot's score. The first ``n_sink`` context tokens are always
kept (the ``sink_window`` budgeter protects them); each KV head keeps its own best-scored others.
One-shot after prefill, original positions.

kvpress equivalence: ``expected_attention:keep_ratio=r`` keeps, per layer and KV head, exactly the
positions ``ExpectedAttentionPress(compression_ratio=1 - r)`` keeps under the query-agnostic
protocol, with and without ``use_vnorm`` (differential tests check both on the default model). Deliberate
differences:

- Value-norm rescaling (``use_vnorm=True``, kvpress's default) multiplies each score by
  ``(score + epsilon) * ||v||``, read from the layer's cached values.
- **Question-aware protocol.** The query statistics come from the context rows only, the softmax
  runs over context slots only, and the future positions start right after the context; kvpress
  never sees a question during compression, so under the query-agnostic protocol this is its
  behaviour.
- ``s`` is the model's own attention scaling (kvpress assumes ``1/sqrt(head_dim)``, the same for
  every model the differential test uses).

Pre-RoPE queries are the forward pass's own (``LayerObservation.projected_queries``: the scorer
declares ``needs_projected_queries``, so the engine keeps each layer's query projection output
instead of this scorer projecting every context row a second time; norm included, as the model
forms them, no rotation); the averaged rotation is built from the adapter's cos/sin for the future
positions, partial rotary included, assuming the ``rotate_half`` pairing every shipped adapter
uses (a RoPE attention factor, as in YaRN or LongRoPE, is in cos/sin and so enters once, as in
kvpress).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.params import policy_with
from kvpress_lab.policy import Composition
from kvpress_lab.validators import non_negative_int, positive_int


def averaged_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``mean_t R_t`` [head_dim, head_dim] from cos/sin [T, rotary_dim] (rotate_half pairing).

    ``R_t x`` is RoPE at position ``t`` applied to ``x``; channels past ``rotary_dim`` stay put.
    ``R_t`` is ``diag(cos_t) + diag(sin_t) P`` with ``P`` the rotate_half pairing, so its mean is
    built from the mean cos and sin directly ([rotary_dim] each, never [T, D, D]).
    """
    rd = cos.shape[-1]
    half = rd // 2
    mean_cos, mean_sin = cos.mean(dim=0), sin.mean(dim=0)
    out = torch.eye(head_dim, device=cos.device, dtype=cos.dtype)
    idx = torch.arange(half, device=cos.device)
    out[idx, idx] = mean_cos[:half]
    out[idx + half, idx + half] = mean_cos[half:]
    out[idx, idx + half] = -mean_sin[:half]  # rotate_half: x_i gets -x_{i+half} sin_i
    out[idx + half, idx] = mean_sin[half:]  # and x_{i+half} gets x_i sin_{i+half}
    return out


def expected_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    rotation: torch.Tensor,
    scaling: float,
    use_covariance: bool,
) -> torch.Tensor:
    """Expected attention of the keys under the queries' Gaussian, per KV head.

    The rotation and the scalings are folded into the ``G`` query heads' statistics of each KV
    head once (``s R mu`` and ``s^2/2 R S R^T``, [D, G] and [D, G*D]); the keys are multiplied
    by them in one product per KV head, so keys are never copied per query head nor rotated.

    Args:
        queries: [B, H_q, s, D] pre-RoPE queries of the rows that give the statistics.
        keys: [B, H, n, D] the keys to score (RoPE applied, sinks and question left out).
        rotation: [D, D] the averaged RoPE rotation of the future positions.
    Returns:
        [H, n] float32: softmax over the ``n`` keys of each query head, mean over its group.
    """
    b, hq, s, d = queries.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    mu = queries.mean(dim=2, keepdim=True)  # [B, H_q, 1, D]
    # columns of the per-KV-head product: first the G rotated, scaled means
    columns = [(torch.matmul(mu, rotation.T) * scaling).view(b, h, g, d).transpose(2, 3)]
    if use_covariance:
        centered = queries - mu
        cov = torch.matmul(centered.transpose(2, 3), centered) / s  # [B, H_q, D, D]
        cov = torch.matmul(rotation, torch.matmul(cov, rotation.T)) * (scaling * scaling / 2)
        # [B, H, D, G*D]: (k @ this)[.., q*D + j] = sum_i k_i S_q[i, j]
        columns.append(cov.view(b, h, g, d, d).transpose(2, 3).reshape(b, h, d, g * d))
    product = torch.matmul(keys, torch.cat(columns, dim=-1))  # [B, H, n, G (+ G*D)]
    logits = product[..., :g]  # s mu.k per query head of the group: [B, H, n, G]
    if use_covariance:  # + s^2/2 k^T S k = sum_j (k S)_j k_j
        quad = product[..., g:].view(b, h, n, g, d).mul_(keys.unsqueeze(3)).sum(dim=-1)
        logits = logits + quad
    probs = torch.softmax(logits, dim=2)  # over the n keys, per query head
    return probs.mean(dim=3).sum(dim=0).float()


@attrs.define(kw_only=True)
class ExpectedAttentionScorer(Scorer):
    """Expected attention of future queries on every context slot after the sinks: [Ly, H, N]."""

    name: ClassVar[str] = "expected_attention"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer
    # the statistics read the queries of every context row: take the forward pass's own
    needs_projected_queries: ClassVar[bool] = True
    n_future_positions: int = attrs.field(default=512, validator=positive_int)
    n_sink: int = attrs.field(default=4, validator=non_negative_int)
    use_covariance: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    use_vnorm: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    epsilon: float = attrs.field(default=0.0, validator=attrs.validators.instance_of((int, float)))

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        n_slots = obs.keys.shape[2]
        out = torch.zeros(obs.keys.shape[1], n_slots, dtype=torch.float32, device=obs.keys.device)
        ctx_end = obs.question_rows.start if obs.question_rows is not None else obs.n_rows
        first = self.n_sink if obs.n_past == 0 else 0  # sinks are the first context rows
        if ctx_end - first < 1:
            return out
        rows = slice(first, ctx_end)
        # the queries before RoPE (projected and normalised as the model does), from the pass
        queries = obs.projected_queries(rows).float()
        # the positions after the context, built on the device (no host read per layer)
        steps = torch.arange(1, self.n_future_positions + 1, device=obs.positions.device)
        future = obs.positions[ctx_end - 1] + steps
        cos, sin = obs.adapter.rotary(obs.layer_idx, future, queries)
        rotation = averaged_rotation(cos[0].float(), sin[0].float(), queries.shape[-1])
        slot0 = self.n_sink if obs.n_past == 0 else 0
        slot1 = obs.n_past + ctx_end
        keys = obs.keys[:, :, slot0:slot1].float()
        scores = expected_attention_scores(
            queries,
            keys,
            rotation.to(queries.device),
            obs.adapter.scaling(obs.layer_idx),
            self.use_covariance,
        )
        if self.use_vnorm:  # attention times what the value contributes (kvpress's default)
            values = obs.values[:, :, slot0:slot1].float()
            scores = (scores + self.epsilon) * values.norm(dim=-1).sum(dim=0)
        out[:, slot0:slot1] = scores
        return out

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        device = observed[0].device  # scores stay on the model's device (no host copy)
        return torch.stack([o.to(device) for o in observed])  # [Ly, H, N]


@attrs.define(kw_only=True)
class ExpectedAttentionPolicy(policy_with(ExpectedAttentionScorer)):
    """Expected Attention (kvpress defaults), one-shot, per KV head; the scorer's parameters."""

    name: ClassVar[str] = "expected_attention"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter, sinks=self.n_sink),
            scorers={"main": self.build(ExpectedAttentionScorer)},
            selector=TopKSelector(scorer="main", granularity="head"),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [ExpectedAttentionScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [ExpectedAttentionPolicy]
