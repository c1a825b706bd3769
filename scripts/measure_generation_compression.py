"""Generation-time compression on vs off at equal peak cache, on a long-generation task.

The task ("copy, then recall"): the context opens with a fact, ``The secret code is NNNN.``,
followed by a numbered list of random word pairs. The question asks the model to copy the list
line by line and, after the last line, write the secret code. The answer is scored on the code
(exact digits), which the model needs only after generating the whole copy (a few hundred
tokens), and on the copy itself (fraction of list lines reproduced exactly).

Three settings per sample, the same policy scorer throughout:

- ``full``: no compression (what the model can do; peak = prompt + answer);
- ``off``: prefill compression only, with the context budget chosen so that prompt + the longest
  allowed answer fit in ``PEAK`` slots (``budget = PEAK - question - (max_new_tokens - 1)``);
- ``on``: the whole context kept at prefill, then ``decode_interval=N,decode_budget=PEAK-N``, so
  the cache never exceeds ``PEAK`` slots either.

Usage (CPU: one answer takes 20 s to 90 s on a loaded 2-core machine)::

    python scripts/measure_generation_compression.py --samples 8 --policy snapkv
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time

import torch

from kvpress_lab.compare.stats import wilson_interval
from kvpress_lab.engine.api import run
from kvpress_lab.models import load_model
from kvpress_lab.prompt import build_prompt

WORDS = (
    "apple river stone cloud tiger lamp green ocean silver candle forest violin garden rocket "
    "pepper window mountain yellow basket planet"
).split()
QUESTION = "Copy the list above exactly, line by line. After the last line, write the secret code."
PREFIX = "1."


def make_sample(seed: int, n_lines: int) -> tuple[str, str, list[str]]:
    rng = random.Random(seed)
    code = str(rng.randint(1000, 9999))
    lines = [f"{i}. {rng.choice(WORDS)} {rng.choice(WORDS)}" for i in range(1, n_lines + 1)]
    context = f"The secret code is {code}.\n\nList:\n" + "\n".join(lines)
    return context, code, lines


def score(answer: str, code: str, lines: list[str]) -> tuple[bool, float]:
    text = PREFIX + " " + answer  # the answer is stripped of the space after "1."
    got = {line.strip() for line in text.splitlines()}
    copied = sum(line in got for line in lines) / len(lines)
    # the code must come after the copy: the last 4-digit number of the answer
    numbers = re.findall(r"\b\d{4}\b", text)
    return bool(numbers) and numbers[-1] == code, copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--lines", type=int, default=20)
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--peak", type=int, default=384)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=260)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="full,off,on", help="which of full,off,on to run")
    ap.add_argument("--out", default="generation_compression.jsonl")
    ap.add_argument("--summarize", nargs="*", help="only print the summary of these JSONL files")
    args = ap.parse_args()
    if args.summarize:
        rows = [json.loads(line) for path in args.summarize for line in open(path)]
        summarize(rows)
        return
    torch.set_num_threads(args.threads)
    lm = load_model()
    rows = []
    with open(args.out, "w") as out:
        for seed in range(args.samples):
            context, code, lines = make_sample(seed, args.lines)
            seg = build_prompt(lm.tokenizer, context, QUESTION, PREFIX)
            L, Q = seg.context_length, seg.question_length
            off_budget = args.peak - Q - (args.max_new_tokens - 1)
            if off_budget < 1:
                raise SystemExit(f"--peak {args.peak} leaves no context for the 'off' setting")
            settings = {
                "full": "full",
                "off": f"{args.policy}:budget={off_budget}",
                "on": (
                    f"{args.policy}:keep_ratio=1,decode_interval={args.interval},"
                    f"decode_budget={args.peak - args.interval}"
                ),
            }
            for name, spec in settings.items():
                if name not in args.settings.split(","):
                    continue
                t0 = time.perf_counter()
                r = run(
                    lm,
                    spec,
                    context,
                    QUESTION,
                    answer_prefix=PREFIX,
                    max_new_tokens=args.max_new_tokens,
                )
                ok, copied = score(r.answer, code, lines)
                row = {
                    "seed": seed,
                    "setting": name,
                    "spec": spec,
                    "context_tokens": L,
                    "question_tokens": Q,
                    "generated": len(r.answer_token_ids),
                    "code_correct": ok,
                    "lines_copied": copied,
                    "peak_decode_kv_tokens": r.decode_peak_kv_tokens,
                    "decode_compressions": r.decode_compressions,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "tail": r.answer[-60:],
                }
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), flush=True)
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    """Code accuracy (Wilson 95% interval), lines copied, peak cache, per policy and setting."""
    keys = sorted(
        {(r["spec"].split(":")[0] if r["setting"] != "full" else "", r["setting"]) for r in rows}
    )
    print()
    for policy, name in keys:
        sel = [
            r
            for r in rows
            if r["setting"] == name and (name == "full" or r["spec"].split(":")[0] == policy)
        ]
        k = sum(r["code_correct"] for r in sel)
        ci = wilson_interval(k, len(sel))
        # stricter: the code is in the answer's last 60 characters (written after the copy)
        end = sum(make_sample(r["seed"], 1)[1] in r["tail"] for r in sel)
        end_ci = wilson_interval(end, len(sel))
        copied = sum(r["lines_copied"] for r in sel) / len(sel)
        peak = max(r["peak_decode_kv_tokens"] for r in sel)
        gen = sum(r["generated"] for r in sel) / len(sel)
        comps = sum(r["decode_compressions"] for r in sel) / len(sel)
        print(
            f"{policy or 'full':7s} {name:4s} code {k}/{len(sel)} = {k / len(sel):.2f} (95% Wilson "
            f"{ci.low:.2f}-{ci.high:.2f})  code at the end {end}/{len(sel)} ({end_ci.low:.2f}-"
            f"{end_ci.high:.2f})  lines copied {copied:.2f}  max peak {peak}  "
            f"mean generated {gen:.0f}  mean decode compressions {comps:.1f}"
        )


if __name__ == "__main__":
    main()
