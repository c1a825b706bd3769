"""Token-retention pages: the context with every token shaded by how much of the cache kept it.

A token's *retention* is the fraction of (layer, KV head) pairs whose compressed cache still holds
it (:attr:`kvpress_lab.engine.result.RunResult.retention`): 1 for a token every head kept, 0 for a
dropped one, in between for per-layer or per-head selections. The pages are single HTML files
with inline CSS and no scripts or external assets, so they open anywhere and can be attached to a
bug report.

Every context token is one ``<span class="tok ...">`` with ``data-i`` (its index in the context)
and ``data-kept`` (its retention, two decimals); the class is ``kept`` (retention 1), ``dropped``
(0) or ``partial``, plus a shade class ``s0`` .. ``s10``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_retention_html", "write_compare_pages", "write_retention_html"]

_SHADES = 10

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d1d1f;
background:#fff;max-width:1100px}
h1{font-size:20px;margin:0 0 4px}
h2{font-size:15px;margin:18px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:10px}
table.params{border-collapse:collapse;font-size:13px}
table.params td{border:1px solid #ddd;padding:2px 8px;font-family:ui-monospace,monospace}
.qa{background:#f6f6f8;border-radius:6px;padding:8px 12px;font-size:14px}
.qa b{display:inline-block;min-width:90px}
.legend{display:flex;gap:14px;align-items:center;font-size:13px;margin:6px 0 10px}
.legend .sw{display:inline-block;width:28px;height:14px;border:1px solid #bbb;
vertical-align:middle;margin-right:4px}
.context{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;
line-height:1.75;white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;
border-radius:6px;padding:10px 12px}
.tok{border-radius:2px}
.tok.dropped{color:#9a9a9a}
.tok.special{font-style:italic;font-size:11px}
""" + "".join(
    f".s{i}{{background:rgba(46,160,67,{0.18 + 0.62 * i / _SHADES:.2f})}}\n"
    for i in range(1, _SHADES + 1)
)


def _token_texts(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, bool]]:
    """Decode every token on its own: (text, is_special)."""
    out = []
    for tid in ids:
        tid = int(tid)
        try:
            text = tokenizer.decode([tid], skip_special_tokens=False)
        except TypeError:
            text = tokenizer.decode([tid])
        if text:
            out.append((text, False))
            continue
        name = None
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        if convert is not None:
            try:
                name = convert(tid)
            except Exception:  # a tokenizer without that id's token string
                name = None
        out.append((name or f"<{tid}>", True))
    return out


def _fraction(value: float) -> str:
    return f"{value:.2f}"


def _param_rows(params: Mapping[str, Any]) -> str:
    return "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(repr(v))}</td></tr>"
        for k, v in params.items()
    )


def _context_spans(result: Any, tokenizer: Any) -> str:
    retention = result.retention.tolist()
    texts = _token_texts(tokenizer, result.context_token_ids)
    parts = []
    for i, ((text, special), kept) in enumerate(zip(texts, retention, strict=True)):
        if kept >= 1.0 - 1e-9:
            state = "kept"
        elif kept <= 1e-9:
            state = "dropped"
        else:
            state = "partial"
        shade = 0 if state == "dropped" else max(1, round(kept * _SHADES))
        cls = f"tok {state} s{shade}" + (" special" if special else "")
        parts.append(
            f'<span class="{cls}" data-i="{i}" data-kept="{_fraction(kept)}" '
            f'title="#{i} kept by {kept:.0%} of layers/heads">{html.escape(text)}</span>'
        )
    return "".join(parts)


def render_retention_html(
    result: Any,
    tokenizer: Any,
    question: str,
    answer_prefix: str = "",
    *,
    title: str | None = None,
    references: Sequence[str] = (),
) -> str:
    """The retention page of ``result`` as an HTML string (see :func:`write_retention_html`)."""
    n = result.context_tokens
    kept = result.kept_tokens
    ly, h = (int(d) for d in result.kept_indices.shape[:2])
    title = title or f"{result.policy_name}: token retention"
    share = kept / n if n else 0.0
    legend = (
        '<div class="legend">'
        '<span><span class="sw s10"></span>kept by every layer and KV head</span>'
        '<span><span class="sw s5"></span>kept by some (shade = fraction)</span>'
        '<span><span class="sw" style="background:#fff"></span>dropped everywhere '
        '(<span class="tok dropped">grey text</span>)</span>'
        "</div>"
    )
    refs = (
        f"<div><b>reference</b> {html.escape(' | '.join(references))}</div>" if references else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">model <b>{html.escape(str(result.model))}</b> &middot; protocol
<b>{html.escape(str(result.protocol))}</b> &middot; kept <b id="kept">{kept:g}</b> of
<b id="context-tokens">{n}</b> context tokens per layer/head ({share:.1%}; target
{result.target_tokens}) &middot; {ly} layers &times; {h} KV heads &middot; blocks {result.blocks}
</div>
<h2>Policy {html.escape(result.policy_name)}</h2>
<table class="params">{_param_rows(result.policy_params)}</table>
<h2>Question and answer</h2>
<div class="qa">
<div><b>question</b> <span id="question">{html.escape(question)}</span></div>
<div><b>answer</b> <span id="answer"><i>{html.escape(answer_prefix)}</i> {html.escape(result.answer)}</span></div>
{refs}
</div>
<h2>Context</h2>
{legend}
<div class="context" id="context">{_context_spans(result, tokenizer)}</div>
</body>
</html>
"""


def write_retention_html(
    result: Any, tokenizer: Any, path: str | Path, question: str, answer_prefix: str = ""
) -> Path:
    """Write the retention page of ``result`` to ``path`` and return the path.

    ``tokenizer`` decodes each context token; ``question`` and ``answer_prefix`` are shown with
    the answer. Used by ``kvlab run --html out.html``.
    """
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_retention_html(result, tokenizer, question, answer_prefix), "utf-8")
    return out


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
    return slug[:80] or "page"


def _sample_field(sample: Any, name: str, default: Any = "") -> Any:
    if isinstance(sample, Mapping):
        return sample.get(name, default)
    return getattr(sample, name, default)


def write_compare_pages(
    results: Mapping[str, Any] | Sequence[Any],
    tokenizer: Any,
    out_dir: str | Path,
    sample: Any,
) -> list[Path]:
    """One retention page per policy for one sample, plus an ``index.html`` linking them.

    ``results`` maps a label (e.g. the policy spec) to that policy's
    :class:`~kvpress_lab.engine.result.RunResult` on ``sample``; a plain sequence of results is
    labelled by policy name. ``sample`` is a :class:`kvpress_lab.tasks.base.Sample` (or anything
    with ``question``, ``answer_prefix`` and optionally ``answers`` and ``sample_id``). Returns
    the paths written, the index first.
    """
    if not isinstance(results, Mapping):
        labelled: dict[str, Any] = {}
        for r in results:
            label, n = r.policy_name, 1
            while label in labelled:
                n += 1
                label = f"{r.policy_name} ({n})"
            labelled[label] = r
        results = labelled
    question = _sample_field(sample, "question")
    prefix = _sample_field(sample, "answer_prefix") or ""
    answers = tuple(_sample_field(sample, "answers", ()) or ())
    sid = str(_sample_field(sample, "sample_id") or "sample")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    rows = []
    used: set[str] = set()
    for label, result in results.items():
        stem, n = f"{_slug(sid)}__{_slug(label)}", 1
        name = f"{stem}.html"
        while name in used or name == "index.html":
            n += 1
            name = f"{stem}-{n}.html"
        used.add(name)
        page = out / name
        page.write_text(
            render_retention_html(
                result,
                tokenizer,
                question,
                prefix,
                title=f"{label} on {sid}: token retention",
                references=answers,
            ),
            "utf-8",
        )
        paths.append(page)
        rows.append(
            f'<tr><td><a href="{html.escape(page.name)}">{html.escape(label)}</a></td>'
            f"<td>{result.kept_tokens:g} / {result.context_tokens}</td>"
            f"<td>{html.escape(result.answer)}</td></tr>"
        )
    index = out / "index.html"
    index.write_text(
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(sid)}: token retention</title>
<style>{_CSS} table.idx td,table.idx th{{border:1px solid #ddd;padding:3px 8px;font-size:13px}}
table.idx{{border-collapse:collapse}}</style></head>
<body><h1>{html.escape(sid)}: token retention per policy</h1>
<div class="qa"><div><b>question</b> {html.escape(question)}</div>
<div><b>reference</b> {html.escape(" | ".join(answers))}</div></div>
<h2>Policies</h2>
<table class="idx"><tr><th>policy</th><th>kept / context tokens</th><th>answer</th></tr>
{"".join(rows)}</table></body></html>
""",
        "utf-8",
    )
    return [index, *paths]
