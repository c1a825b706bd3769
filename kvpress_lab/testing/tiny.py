"""Tiny random models built in-process (no downloads) and character-level tokenizers for them.

The models are randomly initialised, so their answers are meaningless; they exercise every code
path of the engine (GQA, RoPE, several layers) in milliseconds on a CPU.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from kvpress_lab.models import LoadedModel

__all__ = [
    "ARCHS",
    "TinyTokenizer",
    "char_tokenizer",
    "save_tiny_model",
    "tiny_config",
    "tiny_model",
]

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2")
VOCAB_SIZE = 260


class TinyTokenizer:
    """Character tokenizer: one token per character (ids 3..252), BOS 1, EOS 2, no chat template."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + (ord(c) % 250) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return "".join(chr(i - 3) for i in ids if i >= 3)


def tiny_config(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, **extra):
    """A transformers config for a tiny model of architecture ``arch`` (one of `ARCHS`).

    Each family keeps its distinguishing features switched on: mistral a sliding window, phi3
    fused qkv with partial rotary, gemma2 logit soft-capping, gemma2/gemma3 alternating sliding
    and full layers (gemma3 with its own local rotary base), qwen3/gemma3 per-head q_norm, olmo2
    q_norm over the whole projection. Windows are longer than the tests' prompts; pass
    ``sliding_window=`` to shorten them.
    """
    import transformers

    classes = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "phi3": "Phi3Config",
        "gemma2": "Gemma2Config",
        "gemma3": "Gemma3TextConfig",
        "olmo2": "Olmo2Config",
    }
    if arch not in classes:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(ARCHS)}")
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    alternating = ["sliding_attention", "full_attention"] * layers
    if arch == "mistral":
        kwargs["sliding_window"] = 4096
    if arch in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    if arch == "phi3":
        kwargs.pop("head_dim")  # phi3 derives it: hidden_size / heads = 16
        kwargs["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        }
    if arch == "gemma2":
        kwargs.update(
            query_pre_attn_scalar=16,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=30.0,
            sliding_window=4096,
            layer_types=alternating[:layers],
        )
    if arch == "gemma3":
        kwargs.update(
            query_pre_attn_scalar=16, sliding_window=4096, layer_types=alternating[:layers]
        )
    kwargs.update(extra)
    return getattr(transformers, classes[arch])(**kwargs)


def _random_model(arch: str, seed: int, attn: str | None, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **config)
    # None: transformers' own default, SDPA where the architecture supports it (gemma2 on
    # transformers >= 5.3 does not: soft-capping needs eager)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def tiny_model(
    arch: str = "llama", seed: int = 0, attn: str | None = None, **config
) -> LoadedModel:
    """A tiny random model with a `TinyTokenizer`, ready for `kvpress_lab.run`.

    ```python
    from kvpress_lab import run
    from kvpress_lab.testing import tiny_model

    lm = tiny_model(layers=2, heads=4, kv_heads=2)   # lm.name == "tiny-llama"
    result = run(lm, "snapkv:keep_ratio=0.25", "some long text ...", "a question?")
    ```

    ``config`` overrides the config (``layers``, ``heads``, ``kv_heads`` or any transformers
    config field); the same ``seed`` gives the same weights.
    """
    model = _random_model(arch, seed, attn, **config)
    return LoadedModel(model, TinyTokenizer(), f"tiny-{arch}", torch.device("cpu"), torch.float32)


def char_tokenizer():
    """A ``transformers`` fast tokenizer with one token per printable ASCII character.

    Built offline with the ``tokenizers`` library (a BPE model without merges, so every character
    is one token); it adds BOS, decodes without spaces between tokens and can be saved with
    ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def save_tiny_model(
    path: str | os.PathLike, arch: str = "llama", seed: int = 0, tokenizer=None, **config
) -> Path:
    """Save a tiny random model and a tokenizer to ``path`` and return the path.

    The tokenizer is :func:`char_tokenizer` unless one is given (e.g. a real model's, so that
    token counts match that model's; the vocabulary size follows it). The directory loads like
    any Hugging Face model directory, so the CLI can use it::

        kvlab run --model PATH --context-file doc.txt --question "..."
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer() if tokenizer is None else tokenizer
    if tokenizer is not None:
        config.setdefault("vocab_size", len(tok))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, name, None)
            config.setdefault(name, value if value is not None else 0)
    model = _random_model(arch, seed, None, **config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
