"""FastChat's generation parameters, checked once at the edge into a frozen request."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastchat.constants import ErrorCode

from ..core.config import GREEDY_TEMPERATURE

GREEDY_TOP_P = 1e-8            # FastChat's rule: below it (or GREEDY_TEMPERATURE), decode greedily
MAX_STOPS = 16                                  # request's stop strings plus the template's
MAX_LOGIT_BIAS = 300                            # OpenAI's limit on logit_bias entries
MAX_LOGPROBS = 20                               # alternatives per token


class ParamError(ValueError):
    """A request the worker refuses; `code` is the FastChat/OpenAI error code to answer with."""

    def __init__(self, message: str, code: int = ErrorCode.PARAM_OUT_OF_RANGE):
        super().__init__(message)
        self.code = int(code)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str                      # the text; FastChat's helpers read it
    prompt_token_ids: tuple[int, ...] | None = None   # fed as they are instead of the text's ids
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1: off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    echo: bool = True                # the prompt starts the returned text
    logprobs: int | None = None      # None: off; else alternatives listed per token
    seed: int | None = None          # None: a fresh one per sampled request
    logit_bias: tuple[tuple[int, float], ...] = ()    # (token id, bias added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_p < GREEDY_TOP_P


def _number(params: dict, name: str, default, low: float, high: float | None = None,
            kind=float, low_open: bool = False):
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise ParamError(f"'{name}' must be a{'n integer' if kind is int else ' number'}, "
                         f"got {value!r}", ErrorCode.VALIDATION_TYPE_ERROR)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ParamError(f"'{name}' must be {bound}, got {value}")
    return kind(value)


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ParamError(f"'stop' must be a string or a list of strings, got {value!r}")
    if len(items) > MAX_STOPS:
        raise ParamError(f"'stop' allows at most {MAX_STOPS} strings, got {len(items)}")
    if not all(items):
        raise ParamError("'stop' strings must not be empty")
    return tuple(items)


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ParamError(f"'stop_token_ids' must be a list of token ids, got {value!r}")
    return tuple(value)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _in_vocab(name: str, ids, vocab_size: int | None) -> None:
    """ParamError when a token id is one the model has no embedding or logit for."""
    outside = [t for t in ids if t >= vocab_size] if vocab_size is not None else []
    if outside:
        raise ParamError(f"'{name}' token id {outside[0]} is outside the model's vocabulary of "
                         f"{vocab_size} tokens")


def _bias_entry(key, value) -> tuple[int, float]:
    """One logit_bias entry: its key (an int, or JSON's string of one) and its bias."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    if not _is_id(key):
        raise ParamError(f"'logit_bias' keys must be token ids (integers >= 0), got {key!r}",
                         ErrorCode.VALIDATION_TYPE_ERROR)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and -100 <= value <= 100):
        raise ParamError(f"'logit_bias' values must be numbers in [-100, 100], got {value!r} "
                         f"for token {key}")
    return key, float(value)


def logit_bias(value, vocab_size: int | None = None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias {token id: bias in [-100, 100]} as sorted (id, bias) pairs."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ParamError(f"'logit_bias' must map token ids to numbers, got {value!r}",
                         ErrorCode.VALIDATION_TYPE_ERROR)
    if len(value) > MAX_LOGIT_BIAS:
        raise ParamError(f"'logit_bias' allows at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
    pairs = dict(_bias_entry(key, bias) for key, bias in value.items())
    if len(pairs) < len(value):
        raise ParamError("'logit_bias' names a token id twice")
    _in_vocab("logit_bias", pairs, vocab_size)
    return tuple(sorted(pairs.items()))


def _prompt_token_ids(value, vocab_size: int | None) -> tuple[int, ...] | None:
    """The prompt given as token ids (OpenAI's completions accept them), or None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(map(_is_id, value)):
        raise ParamError(f"'prompt' as token ids must be a non-empty list of integers >= 0, "
                         f"got {value!r}", ErrorCode.VALIDATION_TYPE_ERROR)
    _in_vocab("prompt", value, vocab_size)
    return tuple(value)


def _refuse_unsupported(params: dict) -> None:
    """Options FastChat forwards that this worker cannot honour yet: refused, never ignored."""
    if params.get("images"):
        raise ParamError("images are not supported: the Jacobi worker serves text models")
    if (params.get("best_of") or 1) > 1 or params.get("use_beam_search"):
        raise ParamError("'best_of' > 1 and beam search are not supported by the Jacobi worker")
    for name in ("presence_penalty", "frequency_penalty"):
        if params.get(name):
            raise ParamError(f"'{name}' is not supported by the Jacobi worker (use "
                             f"repetition_penalty)")


def parse_params(params: dict, vocab_size: int | None = None) -> GenerationRequest:
    """FastChat's /worker_generate(_stream) body -> GenerationRequest; ParamError if invalid.

    vocab_size: the model's, when known: token ids at or above it are refused."""
    prompt, ids = params.get("prompt"), _prompt_token_ids(params.get("prompt_token_ids"),
                                                          vocab_size)
    if ids is not None and prompt is None:
        prompt = ""                   # the text is only shown; the ids are what is fed
    if not isinstance(prompt, str) or not (prompt or ids):
        raise ParamError("'prompt' must be a non-empty string", ErrorCode.VALIDATION_TYPE_ERROR)
    _refuse_unsupported(params)
    top_k = _number(params, "top_k", -1, -1, kind=int)
    if top_k == 0:
        raise ParamError("'top_k' must be -1 (off) or >= 1, got 0")
    return GenerationRequest(
        prompt=prompt,
        prompt_token_ids=ids,
        max_new_tokens=_number(params, "max_new_tokens", 256, 1, kind=int),
        temperature=_number(params, "temperature", 1.0, 0.0),
        top_p=_number(params, "top_p", 1.0, 0.0, 1.0),
        top_k=top_k,
        repetition_penalty=_number(params, "repetition_penalty", 1.0, 0.0, low_open=True),
        stop=_stops(params.get("stop")),
        stop_token_ids=_token_ids(params.get("stop_token_ids")),
        echo=bool(params.get("echo", True)),
        logprobs=_number(params, "logprobs", None, 0, MAX_LOGPROBS, kind=int),
        seed=_number(params, "seed", None, 0, kind=int),
        logit_bias=logit_bias(params.get("logit_bias"), vocab_size),
    )
