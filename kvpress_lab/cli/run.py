"""``kvlab run``: compress one context with one policy and answer one question."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvpress_lab.errors import InputError, KvlabError, PluginError

# torch, transformers and the plugins load inside run(), so `kvlab --help` stays fast


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="answer a question over a compressed context")
    p.add_argument(
        "--policy", default="full", help="policy spec, e.g. snapkv:keep_ratio=0.25 (default: full)"
    )
    p.add_argument("--context-file", required=True, type=Path, help="text file holding the context")
    p.add_argument("--question", required=True, help="the question to answer")
    p.add_argument(
        "--answer-prefix", default="", help="text the answer starts with (e.g. 'The pass key is')"
    )
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face id, local directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)"
    )
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: by device)")
    p.add_argument(
        "--attn",
        default=None,
        metavar="IMPL",
        help="attention implementation: sdpa (the default where the architecture supports it), eager, or flash_attention_2 (opt-in, needs flash-attn; refused for block-wise policies at original positions)",
    )
    p.add_argument(
        "--query-agnostic",
        action="store_true",
        help="compress the context without seeing the question",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="use plain text even if the tokenizer has a chat template",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--html", type=Path, default=None, help="write a token-retention page to this file"
    )
    p.set_defaults(handler=run)


def read_context(path: Path) -> str:
    if not path.exists():
        raise InputError(f"context file {path} does not exist")
    if path.is_dir():
        raise InputError(f"context file {path} is a directory; give a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read context file {path}: {exc}") from None
    if not text.strip():
        raise InputError(f"context file {path} is empty; give some text to compress")
    return text


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvpress_lab.engine.api import run_segments
    from kvpress_lab.engine.checks import check_prompt_fits
    from kvpress_lab.models import load_model, load_tokenizer, model_max_positions, resolve_model
    from kvpress_lab.outputs import check_output_file
    from kvpress_lab.prompt import build_prompt
    from kvpress_lab.spec import load_policy

    # every input and output is checked before the weights load (tens of seconds)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    policy = load_policy(args.policy)
    context = read_context(args.context_file)
    if not args.question.strip():
        raise InputError("the question is empty; give a question (--question)")
    check_output_file(args.html, "--html")
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    segments = build_prompt(
        tokenizer, context, args.question, args.answer_prefix, not args.no_chat_template
    )
    check_prompt_fits(
        model_max_positions(source),
        source.name,
        segments.context_length,
        segments.question_length,
        args.max_new_tokens,
        fix=f"shorten the context in {args.context_file} to at most {{room}} tokens",
    )
    with _plugin_failures(policy):
        policy.compose().budgeter.validate(segments.context_length)
    lm = load_model(
        source,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn,
        tokenizer=tokenizer,
    )
    with _plugin_failures(policy):
        result = run_segments(
            lm,
            policy,
            segments,
            query_agnostic=args.query_agnostic,
            max_new_tokens=args.max_new_tokens,
        )
    if args.html is not None:
        from kvpress_lab.views.retention import write_retention_html

        write_retention_html(
            result,
            lm.tokenizer,
            args.html,
            question=args.question,
            answer_prefix=args.answer_prefix,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    console = Console()
    console.print(f"[bold]answer:[/] {result.answer}", highlight=False)
    table = Table(show_header=False, box=None)
    rows = [
        ("policy", repr(policy)),
        ("model", result.model),
        ("protocol", result.protocol),
        ("context tokens", str(result.context_tokens)),
        (
            "kept tokens / layer",
            f"{result.kept_tokens:.0f} ({result.kept_tokens / result.context_tokens:.1%})",
        ),
        (
            "kept / layer min-mean-max",
            "{:.1f} / {:.1f} / {:.1f}".format(*result.kept_per_layer_range),
        ),
        (
            "KV memory",
            f"{result.kv_bytes_kept / 2**20:.2f} MiB of {result.kv_bytes_full / 2**20:.2f} MiB",
        ),
        (
            "peak KV during prefill",
            f"{result.peak_kv_bytes / 2**20:.2f} MiB ({result.peak_kv_tokens} tokens)",
        ),
        (
            "prefill / compress / decode",
            f"{result.prefill_s:.2f} s / {result.compress_s:.2f} s / {result.decode_s:.2f} s",
        ),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return 0


class _plugin_failures:
    """Turn an exception raised by one of the policy's plugins into a one-line PluginError
    (exit status 3) naming the plugin and its distribution; bad input stays a KvlabError (2)
    and errors no plugin caused keep their traceback (they are bugs)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        if isinstance(exc, KvlabError) and not isinstance(exc, PluginError):
            return False
        from kvpress_lab.failures import plugin_error

        failure = plugin_error(exc, self.policy)
        if failure is None:
            return False
        raise failure from None
