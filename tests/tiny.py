"""Tiny random models built in-process (no downloads), and a minimal tokenizer for them."""

from __future__ import annotations

import torch

from kvpress_lab.models import LoadedModel

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class TinyTokenizer:
    """Whitespace-free byte tokenizer: one token per character, ids 3..258."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + (ord(c) % 250) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)


def tiny_config(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
    }[arch]
    kwargs = dict(
        vocab_size=260,
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
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    kwargs.update(extra)
    return cls(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "sdpa", **config) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **config)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    return LoadedModel(model, TinyTokenizer(), f"tiny-{arch}", torch.device("cpu"), torch.float32)


def char_tokenizer():
    """A real (fast, saveable) character-level tokenizer built offline: ids 0-3 are specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_tiny_model(path, arch: str = "llama", seed: int = 0, max_positions: int = 4096):
    """Save a tiny random model plus a char tokenizer to ``path`` (usable as ``--model path``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=100, max_position_embeddings=max_positions)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
