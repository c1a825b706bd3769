"""Every shipped policy on the default model on CUDA (bf16, SDPA): a passkey prompt of about
16k tokens, keep 0.25; prints a markdown table for docs/benchmarks.md. Run by scripts/gpu-check.sh.

The default model has 8192 positions, so the prompt is capped below that; pass a model id or
directory with a longer context as the first argument to go further (e.g. 16k-32k).
"""

from __future__ import annotations

import sys
import time

import torch

from kvpress_lab import load_model, run

POLICIES = ["full", "snapkv", "h2o", "streamingllm", "finch", "laserkv"]


def main(model: str | None = None, tokens: int = 16000) -> None:
    lm = load_model(model, device="cuda", dtype="bfloat16")
    limit = (lm.max_positions or tokens) - 200
    words = min(tokens, limit) // 9  # ~9 tokens per filler sentence pair
    context = (
        "The grass is green. The sky is blue. " * (words // 2)
        + "The pass key is 71432. Remember it. "
        + "The sun is yellow. Here we go. " * (words // 2)
    )
    print(f"model {lm.name}, {torch.cuda.get_device_name()}, bf16, SDPA")
    print(
        "| policy | answer | context tokens | kept | KV MiB kept | peak KV MiB | prefill s "
        "| compress s | decode s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in POLICIES:
        spec = name if name == "full" else f"{name}:keep_ratio=0.25"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = run(
            lm,
            spec,
            context,
            "What is the pass key?",
            answer_prefix="The pass key is ",
            max_new_tokens=8,
        )
        wall = time.perf_counter() - t0
        print(
            f"| {spec} | {r.answer!r} | {r.context_tokens} | {r.kept_tokens:.0f} | "
            f"{r.kv_bytes_kept / 2**20:.1f} | {r.peak_kv_bytes / 2**20:.1f} | "
            f"{r.prefill_s:.3f} | {r.compress_s:.3f} | {r.decode_s:.3f} |  (wall {wall:.1f} s)"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
