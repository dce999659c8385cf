"""FastChat's `logprobs` chunk field (OpenAI completions format) from the engine's logprobs.

{"text_offset", "tokens", "token_logprobs", "top_logprobs"}, one entry per answer token. Values
are the model's raw log-probabilities (see fastchat_cllm/core/logprobs.py), as FastChat reports
them; `top_logprobs` maps each of the request's `logprobs` most likely tokens' text to its value.
"""
from __future__ import annotations

from typing import Sequence

from ..core.logprobs import TokenLogprob


class AnswerLogprobs:
    """The logprobs of the answer's tokens, each token's text decoded once."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.entries: list[TokenLogprob] = []
        self.texts: list[str] = []
        self.tops: list[dict[str, float]] = []

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def add(self, entries: list[TokenLogprob]) -> None:
        for entry in entries:
            self.entries.append(entry)
            self.texts.append(self._text(entry.token))
            self.tops.append({self._text(tok): value for tok, value in entry.top})

    def chunk(self, answer_tokens: Sequence[int]) -> dict:
        """The field for an answer of `answer_tokens` (a trailing stop token is not shown)."""
        count = len(answer_tokens)
        if count and answer_tokens[-1] in self.stop_ids:
            count -= 1
        offsets, at = [], 0
        for text in self.texts[:count]:
            offsets.append(at)
            at += len(text)
        return {"text_offset": offsets, "tokens": self.texts[:count],
                "token_logprobs": [e.logprob for e in self.entries[:count]],
                "top_logprobs": self.tops[:count]}
