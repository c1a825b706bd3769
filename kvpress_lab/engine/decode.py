"""Greedy decoding over a (compressed) cache with explicit positions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache

__all__ = ["greedy_decode", "stop_token_ids"]


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn tokens: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, Iterable):
            ids.update(int(e) for e in eos)
    return ids


@torch.no_grad()
def greedy_decode(
    model,
    cache: DynamicCache,
    prompt_ids: torch.Tensor | None,
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    first_logits: torch.Tensor | None = None,
    evictor=None,
) -> list[int]:
    """Feed ``prompt_ids`` (the question) at ``start_position``.., then decode greedily.

    When ``first_logits`` is given the prompt was already fed (its KV is in the cache) and
    decoding starts from those logits. ``evictor``, if given, is called after every forward pass
    with the cache so decode-time policies (H2O's) can keep it at their budget.
    """
    device = next(model.parameters()).device
    position = start_position
    if first_logits is None:
        n = int(prompt_ids.numel())
        slot = cache.get_seq_length()
        out = model(
            input_ids=prompt_ids.to(device)[None],
            past_key_values=cache,
            position_ids=torch.arange(position, position + n, device=device)[None],
            cache_position=torch.arange(slot, slot + n, device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[0, -1]
        position += n
        if evictor is not None:
            evictor.after_forward(cache)
    else:  # the question is already in the cache
        logits = first_logits
        position += int(prompt_ids.numel())
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        if token in stop_ids:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        slot = cache.get_seq_length()
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            past_key_values=cache,
            position_ids=torch.tensor([[position]], device=device),
            cache_position=torch.tensor([slot], device=device),
            use_cache=True,
        )
        logits = out.logits[0, -1]
        position += 1
        if evictor is not None:
            evictor.after_forward(cache)
    return generated
