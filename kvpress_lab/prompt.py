"""Turning (context, question, answer prefix) into the two token segments the engine uses.

The *context segment* is everything before the question: the chat template's opening tokens plus
the context text. The *question segment* is the question, the rest of the template, and the answer
prefix. Only context tokens are ever compressed; the question's KV is always discarded.
"""

from __future__ import annotations

import attrs
import torch

from kvpress_lab.errors import InputError

__all__ = ["PromptSegments", "build_prompt"]


@attrs.frozen
class PromptSegments:
    context_ids: torch.Tensor  # [L] long
    question_ids: torch.Tensor  # [Q] long

    @property
    def context_length(self) -> int:
        return int(self.context_ids.numel())

    @property
    def question_length(self) -> int:
        return int(self.question_ids.numel())

    def full_ids(self) -> torch.Tensor:
        return torch.cat([self.context_ids, self.question_ids])


def build_prompt(
    tokenizer,
    context: str,
    question: str,
    answer_prefix: str = "",
    chat_template: bool = True,
) -> PromptSegments:
    """Tokenize a prompt into context and question segments.

    With a chat template the user turn is ``context + "\\n\\n" + question`` and the answer prefix
    starts the assistant turn; without one, the plain text is used with the tokenizer's BOS.
    """
    if not context or not context.strip():
        raise InputError("the context is empty; give some text to compress")
    if not question or not question.strip():
        raise InputError("the question is empty; give a question (--question)")
    sep = "\n\n"
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + sep + question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        cut = text.index(context) + len(context)
        ctx_text, q_text = text[:cut], text[cut:] + answer_prefix
        ctx_ids = tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
    else:
        ctx_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        q_text = sep + question + "\n" + answer_prefix
    q_ids = tokenizer(q_text, add_special_tokens=False)["input_ids"]
    return PromptSegments(
        torch.tensor(ctx_ids, dtype=torch.long), torch.tensor(q_ids, dtype=torch.long)
    )
