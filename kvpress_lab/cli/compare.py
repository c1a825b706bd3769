"""``kvlab compare``: several policies side by side on long-context tasks, with tables and plots."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvpress_lab.compare.defaults import DEFAULTS
from kvpress_lab.compare.parse import parse_keeps, parse_lengths, parse_list, parse_shard


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def _lengths(values) -> str:
    """``(1024, 4608)`` -> ``"1k,4.5k"`` (k = 1024 tokens, as --lengths reads it)."""
    return ",".join(f"{v / 1024:g}k" if v % 512 == 0 else str(v) for v in values)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare policies side by side on long-context tasks (tables, plots)",
        description=(
            "Run every policy at every keep ratio on generated long-context samples, plus the "
            "full cache, and write results.jsonl, summary.md/.csv, metadata.json and plots. "
            "Rerunning with the same --out resumes; a different sweep into an existing --out is "
            "refused unless --extend. A cell whose plugin fails is recorded as a failed row, the "
            "other cells still run, and the exit status is 3."
        ),
    )
    p.add_argument(
        "--policies",
        required=True,
        help="comma-separated policy specs, e.g. laserkv:alpha=0.5,block_size=1024,snapkv "
        "(a key=value item after NAME:... is a parameter of that spec); may be repeated",
        action="append",
    )
    p.add_argument(
        "--tasks",
        default=_join(DEFAULTS["tasks"]),
        help="comma-separated tasks: niah, niah-multikey, vt, babilong-qa1..qa5, `ruler` (all 13 "
        "RULER tasks, summarized per task and as a group) or one of them as `ruler:<task>` "
        "(e.g. ruler:niah_single_1, ruler:cwe, ruler:qa_1), or .jsonl files (a line may hold a "
        f"`questions` list) (default: {_join(DEFAULTS['tasks'])})",
    )
    p.add_argument(
        "--lengths",
        default=_lengths(DEFAULTS["lengths"]),
        help="context lengths in model tokens, e.g. 500,1k,2k (k = 1024) "
        f"(default: {_lengths(DEFAULTS['lengths'])})",
    )
    p.add_argument(
        "--keep",
        default=_join(DEFAULTS["keeps"]),
        help=f"keep ratios in (0, 1] (default: {_join(DEFAULTS['keeps'])})",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULTS["samples"],
        help=f"samples per task and length (default: {DEFAULTS['samples']})",
    )
    p.add_argument("--model", default=None, help="HF id, directory or .gguf (default: SmolLM2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if any)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: by device)")
    p.add_argument(
        "--attn",
        default=None,
        metavar="IMPL",
        help="attention implementation: sdpa (the default where the architecture supports it), eager, or flash_attention_2 (opt-in, needs flash-attn; refused for block-wise policies at original positions)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sample seed (default: 0)")
    p.add_argument(
        "--query-agnostic",
        action="store_true",
        help="compress without seeing the question (default: question-aware)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result directory; an existing one is resumed when it holds the same sweep "
        "(default: kvlab-results/<timestamp>)",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="add this run's policies, tasks, lengths, keep ratios or samples to the sweep "
        "already in --out (metadata.json records every invocation); without it a different "
        "sweep is refused",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit for every task (default: each task's own, RULER's "
        "tokens_to_generate such as 120 for ruler:cwe, and "
        f"{DEFAULTS['max_new_tokens']} for tasks without one)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="run only shard i of n (i/n, 0-based); rerun without --shard to merge "
        "(under `accelerate launch` shards are set automatically)",
    )
    p.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="run every policy's prefill on its own (slower; for checking)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--html-sample",
        type=int,
        default=None,
        metavar="I",
        help="write token-retention pages (one per policy) for sample I of every task, length "
        "and keep ratio, under OUT/retention/",
    )
    p.set_defaults(handler=run)


def _policy_specs(values: list[str]) -> list[str]:
    """Split ``a,b:x=1,y=2,c`` into specs: a comma starts a new spec unless it is ``key=value``."""
    specs: list[str] = []
    for value in values:
        for item in parse_list(value, "--policies"):
            if specs and "=" in item and ":" not in item and ":" in specs[-1]:
                specs[-1] += "," + item  # another parameter of the previous spec
            else:
                specs.append(item)
    return specs


def _arguments(args: argparse.Namespace) -> str:
    """The command line as parsed, every option spelled out (for the metadata)."""
    parts = ["kvlab", "compare"]
    for action, value in (
        ("--policies", ",".join(args.policies)),
        ("--tasks", args.tasks),
        ("--lengths", args.lengths),
        ("--keep", args.keep),
        ("--samples", args.samples),
        ("--model", args.model),
        ("--device", args.device),
        ("--dtype", args.dtype),
        ("--attn", args.attn),
        ("--seed", args.seed),
        ("--out", args.out),
        ("--max-new-tokens", args.max_new_tokens),
        ("--shard", args.shard),
    ):
        if value is not None:
            parts += [action, str(value)]
    for flag, on in (
        ("--query-agnostic", args.query_agnostic),
        ("--no-shared-prefill", args.no_shared_prefill),
        ("--extend", args.extend),
    ):
        if on:
            parts.append(flag)
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvpress_lab.compare.runner import compare
    from kvpress_lab.errors import InputError, PluginError

    specs = _policy_specs(args.policies)
    tasks = parse_list(args.tasks, "--tasks")
    lengths = parse_lengths(args.lengths)
    keeps = parse_keeps(args.keep)
    shard = parse_shard(args.shard)
    for name, value in (("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise InputError(f"{name} {value} must be >= 1")
    result = compare(
        specs,
        tasks=tasks,
        lengths=lengths,
        keeps=keeps,
        samples=args.samples,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        seed=args.seed,
        query_agnostic=args.query_agnostic,
        out=args.out,
        max_new_tokens=args.max_new_tokens,
        shard=shard,
        share_prefill=not args.no_shared_prefill,
        progress=not args.no_progress,
        html_sample=args.html_sample,
        extend=args.extend,
        command=shlex.join(sys.argv),
        arguments=_arguments(args),
    )
    console = Console()
    if not result.merged:
        console.print(
            f"shard done: {result.ran} row(s) written under {result.out}; run the same command "
            "without --shard (or let `accelerate launch`'s main process finish) to merge",
            highlight=False,
        )
    else:
        from kvpress_lab.compare.report import tighter_intervals_hint

        # soft_wrap: table rows stay one line each when the output is redirected
        hint = tighter_intervals_hint(result.summary, result.out)
        summary_md = (result.out / "summary.md").read_text(encoding="utf-8")
        # summary.md ends with the hint too: printed once, last, after the row count
        body = "\n".join(x for x in summary_md.splitlines() if x != hint).rstrip()
        console.print(body, markup=False, soft_wrap=True)
        console.print(
            f"{result.ran} row(s) run, {len(result.rows)} in {result.out} (results.jsonl, "
            "summary.md, summary.csv, metadata.json, *.png)",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            hint,
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if result.failed:
        raise PluginError(
            f"{len(result.failed)} of {len(result.rows)} row(s) failed, first: "
            f"{result.failed[0]['error']} -- they are failed rows in "
            f"{result.out / 'results.jsonl'} and listed under 'Failed cells' in summary.md; the "
            "other cells ran; rerun the same command to retry only the failed ones"
        )
    return 0
