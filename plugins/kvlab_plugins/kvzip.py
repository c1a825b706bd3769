"""KVzip: score every cached token by how much the model needs it to repeat the context.

Kim, Kim, Kwon, Song, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
2025 (arXiv:2505.23416; reference code snu-mllab/KVzip; NVIDIA kvpress ``KVzipPress``). Once the
context is in the cache, the model is asked to reproduce it: the probe ``"\\n\\nRepeat the previous
context exactly."`` + the chat template's assistant opening + the context tokens is fed over the
cache. A cached pair matters if some probe query attends to it strongly: its score is the
largest softmax weight any query head of its KV group and any probe row gives it. The softmax of
a probe row runs over the attention sinks, the context chunk being reconstructed and the probe's
own earlier rows (kvpress's key subset). Long contexts are reconstructed ``chunk_size`` tokens
at a time; the probe of every chunk after the first is ``"\\n\\nRepeat the part of the previous
context exactly, starting with"`` + the previous chunk's last 8 tokens + the assistant opening +
the chunk. The scores do not depend on any question, so one compressed cache serves them all.

The probe runs through the engine's generic probe pass (:meth:`Scorer.probes`): one extra
forward pass per chunk over the cache, whose KV is dropped afterwards. Its cost is about a second
prefill of the context; it is counted in ``compress_s`` (and ``CompressedContext.probe_s``).

kvpress equivalence (differential test on the default model, context wrapped in the chat
template as kvpress's pipeline does): the scores equal ``KVzipPress``'s, and the kept positions of
every layer and KV head are the top-k of kvpress's scores. Deliberate differences:

- **Budget allocation.** kvpress (``layerwise=False``, its default) prunes the lowest scores over
  all layers and heads at once, so layers and heads keep different numbers of tokens, and it
  masks them at attention time instead of removing them. Here every KV head of every layer keeps
  the same number of tokens (a dense cache, and the fairness rule every policy follows): the
  ``n_sink`` first context tokens (kvpress gives them the highest score) plus each head's
  best-scored others.
- **Chat-template prefix.** kvpress assumes the context starts with the template's opening
  (system prompt, user header) and leaves it unscored; here it is left unscored only when the
  context ids really start with it (a raw context without the template is scored in full).
- **Question-aware protocol.** KVzip is query-agnostic. The question's KV is set aside during the
  probe and never scored, so the kept set is the same with and without the question (kvpress
  never sees the question while compressing).
- KVzip+ normalisation (kvpress ``kvzip_plus_normalization``, off by default) is not implemented.

One-shot only: the probe reconstructs the whole context, so block-wise prefill and
generation-time compression (``decode_interval``) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.errors import ConfigError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Probe, Scorer, StepLayout
from kvpress_lab.params import policy_with
from kvpress_lab.policy import Composition
from kvpress_lab.validators import non_negative_int, positive_int

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
"""Instruction before the first chunk (kvpress / the KVzip paper)."""
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
"""Instruction before every later chunk, followed by the previous chunk's last tokens."""
OVERLAP = 8
"""Tokens of the previous chunk quoted in a later chunk's instruction."""
ROWS_PER_PASS = 512
"""Probe rows whose attention is materialised at once (bounds the scorer's memory)."""


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def template_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids around a user turn in the tokenizer's chat template.

    The prefix is everything before the user's text (system prompt, user header), the suffix
    everything after it up to the assistant's opening. Without a chat template: no prefix and a
    newline suffix. Read the way kvpress reads them, from a dummy user turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        return [], _ids(tokenizer, "\n")
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    before, suffix = text.split(separator)
    return _ids(tokenizer, before.split(dummy)[0]), _ids(tokenizer, suffix)


def reconstruction_probes(
    context_ids: torch.Tensor, tokenizer: Any, chunk_size: int
) -> list[Probe]:
    """The probes that ask the model to repeat ``context_ids`` [L], one per chunk.

    Each probe's ``span`` is the context range it reconstructs; a template prefix the context
    starts with is not reconstructed.
    """
    ctx = context_ids.tolist()
    prefix, suffix = template_parts(tokenizer)
    start = len(prefix) if prefix and ctx[: len(prefix)] == prefix else 0
    if start >= len(ctx):
        raise ConfigError(
            f"kvzip: the context ({len(ctx)} tokens) holds nothing after the chat template's "
            "opening to reconstruct; give a non-empty context"
        )
    probes = []
    for i, s in enumerate(range(start, len(ctx), chunk_size)):
        chunk = ctx[s : s + chunk_size]
        if i == 0:
            head = _ids(tokenizer, FIRST_PROMPT)
        else:
            head = _ids(tokenizer, NEXT_PROMPT) + ctx[s - min(OVERLAP, chunk_size) : s]
        ids = torch.tensor(head + suffix + chunk, dtype=torch.long)
        probes.append(Probe(ids=ids, span=(s, s + len(chunk))))
    return probes


def reconstruction_scores(obs: LayerObservation, n_sink: int) -> torch.Tensor:
    """Max attention of the probe's rows on the slots it reconstructs: [H, span length].

    Each row's softmax runs over the first ``min(n_sink, span start)`` slots, the span's slots
    and the probe's own rows up to itself; the maximum is over rows and the query heads of a KV
    group. Only the span's weights are exponentiated: a row's weight on key ``j`` is
    ``exp(logit_j - logsumexp(logits))``, and ``exp`` keeps the maximum where it is. Rows are
    processed ``ROWS_PER_PASS`` at a time.
    """
    start, end = obs.probe.span
    sink = min(n_sink, start)
    keys = obs.keys
    seen = torch.cat([keys[:, :, :sink], keys[:, :, start:end]], dim=2)  # sinks, then the span
    best = None
    for r0 in range(0, obs.n_rows, ROWS_PER_PASS):
        r1 = min(r0 + ROWS_PER_PASS, obs.n_rows)
        q = obs.queries(slice(r0, r1))
        span = obs.adapter.attention_logits(obs.layer_idx, q, seen)  # [B, H, G, r, sink + n]
        # the probe's own rows, causal: row r sees probe rows 0..r
        own = obs.adapter.attention_logits(
            obs.layer_idx, q, keys[:, :, obs.n_past : obs.n_past + r1]
        )
        later = (
            torch.arange(r1, device=own.device)[None, :]
            > torch.arange(r0, r1, device=own.device)[:, None]
        )
        own = own.masked_fill(later, float("-inf"))
        lse = torch.logaddexp(span.logsumexp(dim=-1), own.logsumexp(dim=-1))  # [B, H, G, r]
        peak = (span[..., sink:] - lse[..., None]).amax(dim=(2, 3)).amax(dim=0)  # [H, n]
        best = peak if best is None else torch.maximum(best, peak)
    return best.exp()


@attrs.define(kw_only=True)
class KVzipScorer(Scorer):
    """Context-reconstruction scores (KVzip) over every context slot: [Ly, H, N]."""

    name: ClassVar[str] = "kvzip"
    n_sink: int = attrs.field(default=4, validator=non_negative_int)
    chunk_size: int = attrs.field(default=2048, validator=positive_int)

    def probes(self, layout: StepLayout, context_ids: torch.Tensor, tokenizer: Any) -> list[Probe]:
        if layout.n_blocks > 1:
            raise ConfigError(
                f"kvzip reconstructs the whole context after one prefill; block-wise prefill "
                f"({layout.n_blocks} blocks) is not supported: run it one-shot (block_size=None)"
            )
        return reconstruction_probes(context_ids, tokenizer, self.chunk_size)

    def observe(self, obs: LayerObservation) -> torch.Tensor | None:
        if obs.probe is None:  # the prefill itself tells KVzip nothing
            return None
        out = obs.previous
        if out is None:
            out = torch.zeros(
                obs.keys.shape[1], obs.layout.n_slots, dtype=torch.float32, device=obs.keys.device
            )
        start, end = obs.probe.span
        out[:, start:end] = reconstruction_scores(obs, self.n_sink)
        return out

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        if any(o is None for o in observed):
            raise RuntimeError(
                "kvzip scores come from the engine's probe pass, which did not run: call "
                "compress_step with probe_inputs (prefill_and_compress does)"
            )
        device = observed[0].device
        return torch.stack([o.to(device) for o in observed])  # [Ly, H, N]


@attrs.define(kw_only=True)
class KVzipPolicy(policy_with(KVzipScorer)):
    """KVzip (kvpress defaults): context-reconstruction scores, one-shot, per KV head; the
    scorer's parameters (``n_sink`` also sizes the budgeter's protected sinks)."""

    name: ClassVar[str] = "kvzip"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.decode_interval is not None:
            raise ConfigError(
                f"kvzip: decode_interval={self.decode_interval} asks for generation-time "
                "compression, which runs no reconstruction probe; leave decode_interval and "
                "decode_budget unset"
            )

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter, sinks=self.n_sink),
            scorers={"main": self.build(KVzipScorer)},
            selector=TopKSelector(scorer="main", granularity="head"),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [KVzipScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [KVzipPolicy]
