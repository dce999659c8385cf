"""The one place where Jacobi decoding options and their defaults live."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .ngram_pool import NGramPool

FILLS = ("lookup", "random")
ACCEPTANCES = ("gumbel", "speculative")
GREEDY_TEMPERATURE = 1e-5   # below this, decoding is greedy (FastChat's threshold)


@dataclass(frozen=True)
class JacobiConfig:
    """Options of one Jacobi decoding call.

    window_size: the largest window (the newest final token + guesses) one forward runs; with
        `adaptive` the engine
        picks a size in [min_window_size, window_size] before every forward.
    fixed_blocks: the reference's block semantics: the window stays in place as a block of
        `window_size` positions, iterated until it is a fixed point before the next block starts
        (trajectory collection uses it).
        Otherwise the window slides: accepted tokens leave it and fresh guesses refill it.
    fill: how positions that have no previous prediction are guessed: "lookup" continues the
        context's own bigrams (falls back to repeating), "random" draws context tokens at random
        (the reference's initial guess).
    window_cost: prior cost of one more window position relative to a 1-token forward, used by the
        adaptive controller until it has timed forwards of that size; None picks one by device.
    seed: seeds the random fill and, when sampling, the sampling noise (same seed, same text).
    temperature, top_p, top_k, repetition_penalty: FastChat's sampling settings; temperature
        below 1e-5 is greedy (exact greedy output; with a repetition penalty, the argmax of the
        penalised logits); top_k 0 and top_p 1 are off; repetition_penalty 1 is off.
    logit_bias: (token id, bias) pairs (a dict is accepted) added to the raw logits before any
        other processing (OpenAI's logit_bias; transformers' single-token `sequence_bias`):
        greedy output is the argmax of the biased logits, samples follow their distribution.
    acceptance: the sampling acceptance rule (sampling.py): "gumbel" fixes the noise of each
        output position (the seed's text at any window size, carried samples kept), or
        "speculative", the textbook rule with fresh randomness per forward.
    logprobs: None (off) or how many most likely alternatives to report with each final
        token's logprob (0: the token's own logprob only).
    prompt_logprobs: also report the logprobs of the prompt's tokens (after the first), from the
        prefill (which then keeps all its logits); needs `logprobs`.
    prompt_lookup: 0 (off) or the longest suffix the context lookup matches: when the context's
        last N tokens (N from `prompt_lookup` down to 2) occurred before, what followed their
        latest earlier occurrence becomes the window's guesses, in place of the carried
        predictions (prompt-lookup decoding's draft, inside the Jacobi window; outputs that
        copy from the prompt or repeat themselves, e.g. code, gain most). Sliding windows only:
        fixed blocks iterate the reference's way.
    lookup_window: with `adaptive`, a window whose lookup proposes more guesses than its chosen
        size (the request's own alone, the batch's width in a batch) grows to take them, up to
        this size (and window_size); 1: never grows.
    ngram_pool: 0 (off) or how many keys the n-gram pool keeps: n-grams of `ngram_size` tokens
        from the context and the engine's own predictions, proposed as a window's guesses.
    """

    max_new_tokens: int = 256
    window_size: int = 16
    eos_token_id: tuple[int, ...] = ()
    adaptive: bool = True
    min_window_size: int = 1
    fixed_blocks: bool = False
    fill: str = "lookup"
    window_cost: float | None = None
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    acceptance: str = "gumbel"
    logprobs: int | None = None
    prompt_logprobs: bool = False
    prompt_lookup: int = 3
    lookup_window: int = 16
    ngram_pool: int = 0
    ngram_size: int = 4

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id or ()))
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("window_size", self.window_size, 1, 1024)
        _check_int("min_window_size", self.min_window_size, 1, self.window_size)
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.window_cost is not None and not self.window_cost >= 0:
            raise ValueError(f"window_cost must be >= 0, got {self.window_cost!r}")
        self._check_sampling()
        if self.prompt_lookup != 0:
            try:
                _check_int("prompt_lookup", self.prompt_lookup, 2, 16)
            except ValueError as e:
                raise ValueError(f"{e} (or 0: off)") from None
        _check_int("lookup_window", self.lookup_window, 1, 1024)
        _check_int("ngram_pool", self.ngram_pool, 0, 1 << 20)
        _check_int("ngram_size", self.ngram_size, 2, 64)

    def make_pool(self) -> NGramPool | None:
        return NGramPool(self.ngram_size, self.ngram_pool) if self.ngram_pool else None

    def _check_sampling(self) -> None:
        _check_float("temperature", self.temperature, lambda t: t >= 0, ">= 0")
        _check_float("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, 0)
        _check_float("repetition_penalty", self.repetition_penalty, lambda r: r > 0, "> 0")
        self._check_logit_bias()
        if self.acceptance not in ACCEPTANCES:
            raise ValueError(f"acceptance must be one of {ACCEPTANCES}, got {self.acceptance!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (0 or more alternatives)")

    def _check_logit_bias(self) -> None:
        """Normalise logit_bias to sorted (id, bias) pairs, one per id."""
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            pairs = sorted((token, bias) for token, bias in pairs or ())
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to biases, "
                             f"got {self.logit_bias!r}") from None
        for token, bias in pairs:
            _check_int("logit_bias token id", token, 0)
            _check_float("logit_bias value", bias, lambda b: True, "finite")
        if len({token for token, _ in pairs}) < len(pairs):
            raise ValueError("logit_bias names a token id twice")
        object.__setattr__(self, "logit_bias", tuple((t, float(b)) for t, b in pairs))

    @property
    def sampling(self) -> bool:
        """True when tokens are sampled rather than chosen greedily."""
        return self.temperature >= GREEDY_TEMPERATURE

    def with_(self, **changes) -> "JacobiConfig":
        return replace(self, **changes)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value, ok, bound: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {bound}, got {value}")
