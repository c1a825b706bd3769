"""GPU paths: every policy on CUDA in bf16 under SDPA, FlashAttention 2 where installed.

Run with ``scripts/gpu-check.sh`` on a CUDA machine (``pytest -m gpu``). Without a GPU these
tests are skipped: they need one, and the CPU suite covers the same code paths in float32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvpress_lab.engine.api import run_segments
from kvpress_lab.errors import ConfigError
from kvpress_lab.models import LoadedModel
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy
from kvpress_lab.testing import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

POLICIES = [
    "full",
    "random:keep_ratio=0.25",
    "snapkv:keep_ratio=0.25",
    "h2o:keep_ratio=0.25",
    "h2o:keep_ratio=0.25,decode_eviction=true",
    "streamingllm:keep_ratio=0.25,block_size=256",
    "finch:keep_ratio=0.25,block_size=256",
    "laserkv:keep_ratio=0.25,block_size=512",
]
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _segments() -> PromptSegments:
    gen = torch.Generator().manual_seed(0)
    return PromptSegments(
        context_ids=torch.randint(3, 250, (2000,), generator=gen),
        question_ids=torch.randint(3, 250, (16,), generator=gen),
    )


def _on_cuda(lm: LoadedModel, dtype: torch.dtype, attn: str | None = None) -> LoadedModel:
    model = lm.model.to(device="cuda", dtype=dtype)
    if attn is not None:
        model.set_attn_implementation(attn)
    return LoadedModel(model, lm.tokenizer, lm.name, torch.device("cuda"), dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_on_cuda_bf16_keeps_what_cpu_fp32_keeps(arch, policy):
    seg = _segments()
    cpu = run_segments(tiny_model(arch, seed=2, layers=4), load_policy(policy), seg)
    gpu_lm = _on_cuda(tiny_model(arch, seed=2, layers=4), torch.bfloat16)
    gpu = run_segments(gpu_lm, load_policy(policy), seg)
    assert gpu.kept_tokens == cpu.kept_tokens
    a, b = cpu.kept_indices, gpu.kept_indices.cpu()
    overlap = (
        sum(
            len(set(a[i, h].tolist()) & set(b[i, h].tolist()))
            for i in range(a.shape[0])
            for h in range(a.shape[1])
        )
        / a.numel()
    )
    print(f"{arch} {policy}: bf16 CUDA vs fp32 CPU kept-index overlap {overlap:.3f}")
    assert overlap >= 0.8


@pytest.mark.skipif(not HAS_FLASH, reason="flash-attn is not installed (pip install -e '.[flash]')")
def test_flash_attention_one_shot_matches_sdpa_and_block_wise_is_refused():
    seg = _segments()
    sdpa = run_segments(
        _on_cuda(tiny_model("llama", seed=2, layers=4), torch.bfloat16, "sdpa"),
        load_policy("snapkv:keep_ratio=0.25"),
        seg,
    )
    flash_lm = _on_cuda(tiny_model("llama", seed=2, layers=4), torch.bfloat16, "flash_attention_2")
    flash = run_segments(flash_lm, load_policy("snapkv:keep_ratio=0.25"), seg)
    assert flash.kept_tokens == sdpa.kept_tokens
    with pytest.raises(ConfigError, match="--attn sdpa"):
        run_segments(flash_lm, load_policy("laserkv:keep_ratio=0.25,block_size=512"), seg)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p.replace("0.25", "0.5") for p in POLICIES])
def test_default_model_passkey_on_cuda(default_lm_cuda, passkey_segments, policy):
    result = run_segments(default_lm_cuda, load_policy(policy), passkey_segments, max_new_tokens=8)
    print(f"{policy}: {result.answer!r}")
    assert result.kept_tokens <= passkey_segments.context_length


@pytest.fixture(scope="module")
def default_lm_cuda():
    from kvpress_lab.models import load_model

    return load_model(device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def passkey_segments(default_lm_cuda):
    from kvpress_lab.prompt import build_prompt

    context = (
        "The grass is green. The sky is blue. " * 200
        + "The pass key is 71432. Remember it. "
        + "The sun is yellow. Here we go. " * 200
    )
    return build_prompt(
        default_lm_cuda.tokenizer, context, "What is the pass key?", "The pass key is "
    )
