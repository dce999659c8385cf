"""A chat turn as prompt token ids, the way the benchmark, trajectory collection and examples
feed a model (the serving path builds prompts with FastChat's conversation templates instead)."""
from __future__ import annotations

from typing import Sequence


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ready for the assistant's
    answer; the contents joined by newlines when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
