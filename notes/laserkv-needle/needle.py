"""Where does LASER-KV lose the needle? niah at 1024, keep 0.1: kept needle tokens per policy."""
import sys, torch
from kvpress_lab import load_model
from kvpress_lab.engine.api import run_segments
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.tasks import generate_samples
from kvpress_lab.compare.runner import _count_tokens

torch.set_num_threads(1)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
lm = load_model()
tok = lm.tokenizer
specs = sys.argv[2].split(";") if len(sys.argv) > 2 else ["snapkv:keep_ratio=0.1", "laserkv:keep_ratio=0.1", "laserkv:keep_ratio=0.1,alpha=1.0", "laserkv:keep_ratio=0.1,alpha=0.0"]
for s in generate_samples("niah", L, 4, 0, _count_tokens(tok)):
    seg = build_prompt(tok, s.context, s.question, s.answer_prefix, True)
    ids = seg.context_ids.tolist() if hasattr(seg, "context_ids") else None
    ans = s.answers[0]
    # needle token positions: tokens of the context that decode into the answer digits' span
    text_ids = ids
    pieces = [tok.decode([t]) for t in text_ids]
    joined = ""; starts = []
    for p in pieces: starts.append(len(joined)); joined += p
    at = joined.find(ans)
    needle = [i for i, st in enumerate(starts) if at <= st < at + len(ans)]
    # the whole needle sentence: from the previous '.' to the answer end
    sent0 = joined.rfind(".", 0, at)
    sentence = [i for i, st in enumerate(starts) if sent0 < st < at + len(ans)]
    print(f"sample {s.sample_id}: L={len(ids)} answer {ans} value-tokens {needle} sentence {sentence[0]}..{sentence[-1]}")
    for spec in specs:
        r = run_segments(lm, load_policy(spec), seg, max_new_tokens=12)
        ki = r.kept_indices  # [Ly, H, k]
        frac_val = torch.stack([torch.isin(torch.tensor(needle), ki[l, h]).float().mean() for l in range(ki.shape[0]) for h in range(ki.shape[1])])
        frac_sent = torch.stack([torch.isin(torch.tensor(sentence), ki[l, h]).float().mean() for l in range(ki.shape[0]) for h in range(ki.shape[1])])
        print(f"  {spec:40s} kept {r.kept_tokens:.0f} value-tokens kept {frac_val.mean():.2f} sentence kept {frac_sent.mean():.2f} answer {r.answer!r}")
