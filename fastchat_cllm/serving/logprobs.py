"""FastChat's `logprobs` chunk field (OpenAI completions format) from the engine's logprobs.

{"text_offset", "tokens", "token_logprobs", "top_logprobs"}, one entry per token: the prompt's
when the prompt is echoed (its first token has no logprob: null, as OpenAI reports it), then the
answer's. Values are the model's raw log-probabilities (see fastchat_cllm/core/logprobs.py), as
FastChat reports them; `top_logprobs` maps each of the request's `logprobs` most likely tokens'
text to its value (where two tokens read alike, the likelier one's value).

One more key, "detail", is lossless for OpenAI's chat format: per token {"bytes": the token's
own bytes, "top": [[text, logprob, bytes], ...] best first}. A token holding part of a
character decodes to U+FFFD alone; its bytes are read from the tokenizer's vocabulary instead
(byte-level BPE, or SentencePiece's <0xNN> byte pieces). Stock FastChat ignores the key.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

from tokenizers import decoders

from ..core.logprobs import TokenLogprob

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=None)
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's table), inverted: char -> byte.

    Printable bytes stand for themselves; the other 68 map, in byte order, to chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def byte_reader(tokenizer):
    """token id -> its bytes, or None where the vocabulary does not say (then: its text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    alphabet = byte_level_alphabet() if isinstance(getattr(backend, "decoder", None),
                                                   decoders.ByteLevel) else None

    def read(token: int) -> bytes | None:
        piece = tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return None
        if alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        match = BYTE_PIECE.fullmatch(piece)
        return bytes([int(match[1], 16)]) if match else None

    return read


class AnswerLogprobs:
    """The logprobs of the (echoed prompt and) answer tokens, each token decoded once."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.read_bytes = byte_reader(tokenizer)
        self.texts: list[str] = []
        self.offsets: list[int] = []                  # where each text starts
        self.values: list[float | None] = []
        self.tops: list[dict[str, float] | None] = []
        self.details: list[dict] = []
        self.prompt_count = 0

    def _piece(self, token: int) -> tuple[str, list[int]]:
        """A token's text and its bytes."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        raw = self.read_bytes(token)
        return text, list(raw if raw is not None else text.encode("utf-8"))

    def _append(self, token: int, value: float | None,
                top: tuple[tuple[int, float], ...] | None) -> None:
        text, raw = self._piece(token)
        self.offsets.append(self.offsets[-1] + len(self.texts[-1]) if self.texts else 0)
        self.texts.append(text)
        self.values.append(value)
        if top is None:
            self.details.append({"bytes": raw, "top": None})
            self.tops.append(None)
            return
        alternatives, texts = [], {}
        for alt, alt_value in top:                    # best first: keep a text's first value
            alt_text, alt_raw = self._piece(alt)
            alternatives.append([alt_text, alt_value, alt_raw])
            texts.setdefault(alt_text, alt_value)
        self.details.append({"bytes": raw, "top": alternatives})
        self.tops.append(texts)

    def add_prompt(self, first_token: int, entries: list[TokenLogprob]) -> None:
        """The echoed prompt: its first token (no logprob) and the logprobs of the rest."""
        self._append(first_token, None, None)
        self.add(entries)
        self.prompt_count = len(self.texts)

    def add(self, entries: list[TokenLogprob]) -> None:
        for entry in entries:
            self._append(entry.token, entry.logprob, entry.top)

    def chunk(self, answer_tokens: Sequence[int]) -> dict:
        """The field for an answer of `answer_tokens` (a trailing stop token is not shown)."""
        count = len(answer_tokens)
        if count and answer_tokens[-1] in self.stop_ids:
            count -= 1
        count += self.prompt_count
        return {"text_offset": self.offsets[:count], "tokens": self.texts[:count],
                "token_logprobs": self.values[:count], "top_logprobs": self.tops[:count],
                "detail": self.details[:count]}
