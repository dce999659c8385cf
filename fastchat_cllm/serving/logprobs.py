"""FastChat's `logprobs` chunk field (OpenAI completions format) from the engine's logprobs.

{"text_offset", "tokens", "token_logprobs", "top_logprobs"}, one entry per token: the prompt's
when the prompt is echoed (its first token has no logprob: null, as OpenAI reports it), then the
answer's. Values are the model's raw log-probabilities (see fastchat_cllm/core/logprobs.py), as
FastChat reports them; `top_logprobs` maps each of the request's `logprobs` most likely tokens'
text to its value (where two tokens read alike, the likelier one's value).
"""
from __future__ import annotations

from typing import Sequence

from ..core.logprobs import TokenLogprob


class AnswerLogprobs:
    """The logprobs of the (echoed prompt and) answer tokens, each token's text decoded once."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.texts: list[str] = []
        self.values: list[float | None] = []
        self.tops: list[dict[str, float] | None] = []
        self.prompt_count = 0

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top: dict[str, float] = {}
        for token, value in entry.top:                # best first: keep a text's first value
            top.setdefault(self._text(token), value)
        return top

    def add_prompt(self, first_token: int, entries: list[TokenLogprob]) -> None:
        """The echoed prompt: its first token (no logprob) and the logprobs of the rest."""
        self.texts.append(self._text(first_token))
        self.values.append(None)
        self.tops.append(None)
        self.add(entries)
        self.prompt_count = len(self.texts)

    def add(self, entries: list[TokenLogprob]) -> None:
        for entry in entries:
            self.texts.append(self._text(entry.token))
            self.values.append(entry.logprob)
            self.tops.append(self._top(entry))

    def chunk(self, answer_tokens: Sequence[int]) -> dict:
        """The field for an answer of `answer_tokens` (a trailing stop token is not shown)."""
        count = len(answer_tokens)
        if count and answer_tokens[-1] in self.stop_ids:
            count -= 1
        count += self.prompt_count
        offsets, at = [], 0
        for text in self.texts[:count]:
            offsets.append(at)
            at += len(text)
        return {"text_offset": offsets, "tokens": self.texts[:count],
                "token_logprobs": self.values[:count], "top_logprobs": self.tops[:count]}
