"""Where does LASER-KV lose the needle? Kept needle tokens per policy on niah samples.

    python needle.py 1024 ["spec;spec;..."]

Specs ``pooled:keep_ratio=R`` and ``maxhead:keep_ratio=R`` run the script-local variants in
pooled.py (max-pooled exact score; max instead of sum over layers and heads), and
``globalsnap:keep_ratio=R``: SnapKV's scores summed over layers and heads, one index set.
"""

import sys

import torch
from pooled import LOCAL

from kvpress_lab import load_model
from kvpress_lab.compare.runner import _count_tokens
from kvpress_lab.engine.api import run_segments
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.tasks import generate_samples

DEFAULT_SPECS = (
    "snapkv:keep_ratio=0.1;laserkv:keep_ratio=0.1;"
    "laserkv:keep_ratio=0.1,alpha=1.0;laserkv:keep_ratio=0.1,alpha=0.0"
)


def token_spans(tok, ids: list[int], answer: str) -> tuple[list[int], list[int]]:
    """Context positions of the answer's tokens, and of its sentence (from the previous '.')."""
    starts, text = [], ""
    for t in ids:
        starts.append(len(text))
        text += tok.decode([t])
    at = text.find(answer)
    end = at + len(answer)
    value = [i for i, st in enumerate(starts) if at <= st < end]
    sentence_start = text.rfind(".", 0, at)
    sentence = [i for i, st in enumerate(starts) if sentence_start < st < end]
    return value, sentence


def kept_fraction(kept: torch.Tensor, positions: list[int]) -> float:
    """Mean over layers and KV heads of the fraction of ``positions`` kept."""
    wanted = torch.tensor(positions)
    rows = kept.reshape(-1, kept.shape[-1])
    return torch.stack([torch.isin(wanted, row).float().mean() for row in rows]).mean().item()


def main() -> None:
    torch.set_num_threads(1)
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    specs = (sys.argv[2] if len(sys.argv) > 2 else DEFAULT_SPECS).split(";")
    lm = load_model()
    tok = lm.tokenizer
    for s in generate_samples("niah", length, 4, 0, _count_tokens(tok)):
        seg = build_prompt(tok, s.context, s.question, s.answer_prefix, True)
        ids = seg.context_ids.tolist()
        value, sentence = token_spans(tok, ids, s.answers[0])
        print(
            f"sample {s.sample_id}: L={len(ids)} answer {s.answers[0]} value-tokens {value} "
            f"sentence {sentence[0]}..{sentence[-1]}"
        )
        for spec in specs:
            policy = load_policy(spec, registry=LOCAL)
            r = run_segments(lm, policy, seg, max_new_tokens=12)
            print(
                f"  {spec:40s} kept {r.kept_tokens:.0f} "
                f"value-tokens kept {kept_fraction(r.kept_indices, value):.2f} "
                f"sentence kept {kept_fraction(r.kept_indices, sentence):.2f} answer {r.answer!r}"
            )


if __name__ == "__main__":
    main()
