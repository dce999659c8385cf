"""Serving benchmark (and load test): streams chat completions from a running OpenAI API.

At each concurrency c, c streams run at once, each sending `requests_per_stream` requests one
after another. Per request: time to first token (TTFT, first content chunk), latency (to the
end of the stream) and the decoding rate after the first token; per level: their p50/p90/p99,
the aggregate rate (all completion tokens over the level's wall time) and completed requests per
second. A request that fails (an HTTP error, a timeout, or an error chunk in the stream, as
FastChat sends when a worker fails) is counted and its error kept. Completion tokens come from
the stream's usage when the server sends it (and `usage` is on), else from a tokenizer when one
is given, else from the number of content chunks (see `token_source`).

Every request's prompt is made its own ("Request N: " before its last user message; `distinct`)
so that no request repeats an earlier one's: a server that caches prompt prefixes then finds only
what real traffic shares (the system prompt and chat template), not whole prompts it has seen at
an earlier level or in the warm-up. `distinct=False` sends the prompts as they are.
"""
from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import asdict, dataclass, field

from .prompts import Prompt

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ServingConfig:
    url: str
    model: str | None = None              # served model name; None: the first of /v1/models
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_new_tokens: int = 128
    requests_per_stream: int = 1
    timeout: float = 600.0                # seconds per request
    api_key: str | None = field(default=None, repr=False)   # sent as a Bearer token, not saved
    usage: bool = True                    # count tokens from the stream's usage when it has one
    distinct: bool = True                 # each request's prompt its own (see the module doc)

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.max_new_tokens < 1 or self.requests_per_stream < 1:
            raise ValueError("max_new_tokens and requests_per_stream must be >= 1")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")

    def as_dict(self) -> dict:
        out = {**asdict(self), "concurrency": list(self.concurrency)}
        del out["api_key"]
        return out


class StreamError(Exception):
    """The server put an error in the stream (FastChat: {"text": ..., "error_code": N})."""


@dataclass(frozen=True)
class Timing:
    """One streamed request."""

    ttft: float
    seconds: float        # latency: to the end of the stream
    tokens: int
    token_source: str     # "usage", "tokenizer" or "chunks"

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        after = self.seconds - self.ttft
        return (self.tokens - 1) / after if self.tokens > 1 and after > 0 else 0.0


def numbered(messages, number: int) -> list[dict]:
    """The messages with "Request {number}: " before the last user message's content."""
    out = [dict(message) for message in messages]
    last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if last is not None:
        out[last]["content"] = f"Request {number}: {out[last]['content']}"
    return out


async def stream_once(client, config: ServingConfig, model: str, prompt: Prompt,
                      tokenizer=None, number: int | None = None) -> Timing:
    """Send one streaming chat completion (greedy) and time it; `number`: make the prompt the
    request's own (`numbered`)."""
    messages = list(prompt.messages) if number is None else numbered(prompt.messages, number)
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=config.max_new_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True})
    async with stream:
        first, pieces, usage = await _read(stream, started)
    seconds = time.perf_counter() - started
    tokens, source = _count(pieces, usage if config.usage else None, tokenizer)
    return Timing(first if first is not None else seconds, seconds, tokens, source)


async def _read(stream, started: float) -> tuple[float | None, list[str], int | None]:
    """(seconds to the first content piece, the content pieces, the usage's completion tokens)."""
    first, pieces, usage = None, [], None
    async for chunk in stream:
        if getattr(chunk, "error_code", 0):
            raise StreamError(f"error_code {chunk.error_code}: {getattr(chunk, 'text', '')}")
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first if first is not None else time.perf_counter() - started
            pieces.append(piece)
    return first, pieces, usage


def _count(pieces: list[str], usage: int | None, tokenizer) -> tuple[int, str]:
    """Completion tokens and where they come from (see the module docstring)."""
    if usage is not None:
        return usage, "usage"
    if tokenizer is not None:
        return len(tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]), "tokenizer"
    return len(pieces), "chunks"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, linear between the closest ranks (numpy's
    default; p50 is the median): the one formula of the serving summary."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _percentiles(name: str, values: list[float]) -> dict:
    return {f"{name}_p{q}_s": round(percentile(values, q), 4) if values else None
            for q in PERCENTILES}


def level_summary(concurrency: int, timings: list[Timing], wall: float,
                  errors: list[str] = ()) -> dict:
    """Percentiles over the requests that completed; `failed` counts the others (errors kept)."""
    tokens, rates = sum(t.tokens for t in timings), [t.decode_rate for t in timings]
    return {
        "concurrency": concurrency, "requests": len(timings), "failed": len(errors),
        "tokens": tokens, "wall_s": round(wall, 4),
        **_percentiles("ttft", [t.ttft for t in timings]),
        **_percentiles("latency", [t.seconds for t in timings]),
        "stream_tokens_per_second": round(percentile(rates, 50), 3) if rates else None,
        "aggregate_tokens_per_second": round(tokens / wall, 3) if wall > 0 else 0.0,
        "requests_per_second": round(len(timings) / wall, 3) if wall > 0 else 0.0,
        "token_source": sorted({t.token_source for t in timings}),
        "errors": sorted(set(errors)),
    }


async def _level(client, config: ServingConfig, model: str, prompts: list[Prompt],
                 concurrency: int, tokenizer, bar, numbers) -> dict:
    from httpx import HTTPError
    from openai import APIError

    errors: list[str] = []

    async def one_stream(stream: int) -> list[Timing]:
        out = []
        for r in range(config.requests_per_stream):
            prompt = prompts[(stream * config.requests_per_stream + r) % len(prompts)]
            try:
                out.append(await stream_once(client, config, model, prompt, tokenizer,
                                             next(numbers)))
            except (APIError, HTTPError, StreamError) as err:   # a failed request: a result
                errors.append(f"{type(err).__name__}: {err}")
            bar.update()
        return out

    started = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(s) for s in range(concurrency)))
    wall = time.perf_counter() - started
    return level_summary(concurrency, [t for s in streams for t in s], wall, errors)


async def _run(config: ServingConfig, prompts: list[Prompt], tokenizer) -> dict:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    async with AsyncOpenAI(base_url=config.url, api_key=config.api_key or "EMPTY",
                           timeout=config.timeout, max_retries=0) as client:
        model = config.model or (await client.models.list()).data[0].id
        numbers = itertools.count() if config.distinct else itertools.repeat(None)
        await stream_once(client, config, model, prompts[0], tokenizer, next(numbers))  # warm-up
        total = sum(config.concurrency) * config.requests_per_stream
        levels = []
        with tqdm(total=total, file=sys.stderr, desc="serve", unit="req") as bar:
            for c in config.concurrency:
                bar.set_postfix_str(f"concurrency {c}")
                levels.append(await _level(client, config, model, prompts, c, tokenizer, bar,
                                           numbers))
    return {"model": model, "levels": levels}


def run_serving(config: ServingConfig, prompts: list[Prompt], tokenizer=None) -> dict:
    """Measure every concurrency level in turn; returns {"model", "levels"} (JSON-ready)."""
    return asyncio.run(_run(config, prompts, tokenizer))
