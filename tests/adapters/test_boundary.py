"""Only kvpress_lab/adapters/ may know transformers internals.

A source scan of the library and the first-party plugins: forward-hook keyword arguments, cache
layer attributes, the model's cache keyword, attention projections and rotary modules appear
nowhere outside the adapter package. The scan is checked against a planted violation so it can
fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "kvpress_lab", ROOT / "plugins" / "kvlab_plugins"]
ADAPTERS = ROOT / "kvpress_lab" / "adapters"

FORBIDDEN = {
    "forward-hook keyword arguments": r"with_kwargs\s*=\s*True|kwargs\[\s*[\"'](hidden_states|position_embeddings|past_key_values|cache)[\"']",
    "cache layer internals": r"\.layers\[[^\]]*\]\.(keys|values)|cache\.layers\b|get_seq_length\(",
    "the model's cache keyword": r"past_key_values\s*=",
    "attention module fields": r"\.(q_proj|k_proj|qkv_proj|q_norm|k_norm|self_attn|rotary_emb)\b",
    "transformers cache classes": r"\bDynamicCache\b",
    "RoPE internals": r"apply_rotary_pos_emb|\.inv_freq\b",
}
# ops/rope.py implements RoPE arithmetic on tensors it is handed (the adapter hands it the spec)
ALLOWED = {("RoPE internals", ROOT / "kvpress_lab" / "ops" / "rope.py")}


def violations(paths: list[Path]) -> list[str]:
    found = []
    for base in paths:
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for path in files:
            if ADAPTERS in path.parents:
                continue
            text = path.read_text(encoding="utf-8")
            for what, pattern in FORBIDDEN.items():
                if (what, path) in ALLOWED:
                    continue
                for match in re.finditer(pattern, text):
                    line = text.count("\n", 0, match.start()) + 1
                    where = path.relative_to(ROOT) if ROOT in path.parents else path
                    found.append(f"{where}:{line}: {what}: {match.group(0)}")
    return found


def test_nothing_outside_the_adapters_touches_transformers_internals():
    assert violations(SCANNED) == []


@pytest.mark.parametrize(
    "planted",
    [
        "keys = kwargs['past_key_values'].layers[0].keys\n",
        "h = attn.q_proj(x)\n",
        "attn.register_forward_hook(hook, with_kwargs=True)\n",
        "out = model(input_ids=ids, past_key_values=cache)\n",
    ],
)
def test_the_scan_catches_a_planted_violation(tmp_path, planted):
    bad = tmp_path / "plugin.py"
    bad.write_text(planted)
    assert violations([bad])
