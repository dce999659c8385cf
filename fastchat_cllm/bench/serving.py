"""Serving benchmark: streams chat completions from a running OpenAI-compatible API.

At each concurrency c, c streams run at once, each sending `requests_per_stream` requests one
after another. Per request: time to first token (TTFT, first content chunk) and the decoding
rate after it; per level: the aggregate rate, all completion tokens over the level's wall time.
Completion tokens come from the stream's usage when the server sends it, else from a tokenizer
when one is given, else from the number of content chunks (see `token_source`).
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from .prompts import Prompt


@dataclass(frozen=True)
class ServingConfig:
    url: str
    model: str | None = None              # served model name; None: the first of /v1/models
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_new_tokens: int = 128
    requests_per_stream: int = 1
    timeout: float = 600.0

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.max_new_tokens < 1 or self.requests_per_stream < 1:
            raise ValueError("max_new_tokens and requests_per_stream must be >= 1")

    def as_dict(self) -> dict:
        return {**asdict(self), "concurrency": list(self.concurrency)}


@dataclass(frozen=True)
class Timing:
    """One streamed request."""

    ttft: float
    seconds: float
    tokens: int
    token_source: str     # "usage", "tokenizer" or "chunks"

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        after = self.seconds - self.ttft
        return (self.tokens - 1) / after if self.tokens > 1 and after > 0 else 0.0


async def stream_once(client, config: ServingConfig, model: str, prompt: Prompt,
                      tokenizer=None) -> Timing:
    """Send one streaming chat completion (greedy) and time it."""
    started = time.perf_counter()
    first, chunks, text, usage = None, 0, [], None
    stream = await client.chat.completions.create(
        model=model, messages=list(prompt.messages), max_tokens=config.max_new_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first if first is not None else time.perf_counter() - started
            chunks += 1
            text.append(piece)
    seconds = time.perf_counter() - started
    if usage is not None:
        tokens, source = usage, "usage"
    elif tokenizer is not None:
        tokens = len(tokenizer("".join(text), add_special_tokens=False)["input_ids"])
        source = "tokenizer"
    else:
        tokens, source = chunks, "chunks"
    return Timing(first if first is not None else seconds, seconds, tokens, source)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _median(values: list[float], digits: int) -> float | None:
    return round(statistics.median(values), digits) if values else None


def level_summary(concurrency: int, timings: list[Timing], wall: float,
                  errors: list[str] = ()) -> dict:
    """Medians over the requests that completed; `failed` counts the others (errors kept)."""
    tokens, ttfts = sum(t.tokens for t in timings), [t.ttft for t in timings]
    return {
        "concurrency": concurrency, "requests": len(timings), "failed": len(errors),
        "tokens": tokens, "wall_s": round(wall, 4),
        "ttft_median_s": _median(ttfts, 4),
        "ttft_p90_s": round(_percentile(ttfts, 0.9), 4) if ttfts else None,
        "stream_tokens_per_second": _median([t.decode_rate for t in timings], 3),
        "aggregate_tokens_per_second": round(tokens / wall, 3) if wall > 0 else 0.0,
        "token_source": sorted({t.token_source for t in timings}),
        "errors": sorted(set(errors)),
    }


async def _level(client, config: ServingConfig, model: str, prompts: list[Prompt],
                 concurrency: int, tokenizer, bar) -> dict:
    from openai import APIError

    errors: list[str] = []

    async def one_stream(stream: int) -> list[Timing]:
        out = []
        for r in range(config.requests_per_stream):
            prompt = prompts[(stream * config.requests_per_stream + r) % len(prompts)]
            try:
                out.append(await stream_once(client, config, model, prompt, tokenizer))
            except APIError as err:   # a failed request is a result too (e.g. a server timeout)
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

    async with AsyncOpenAI(base_url=config.url, api_key="EMPTY", timeout=config.timeout,
                           max_retries=0) as client:
        model = config.model or (await client.models.list()).data[0].id
        await stream_once(client, config, model, prompts[0], tokenizer)   # warm-up
        total = sum(config.concurrency) * config.requests_per_stream
        levels = []
        with tqdm(total=total, file=sys.stderr, desc="serve", unit="req") as bar:
            for c in config.concurrency:
                bar.set_postfix_str(f"concurrency {c}")
                levels.append(await _level(client, config, model, prompts, c, tokenizer, bar))
    return {"model": model, "levels": levels}


def run_serving(config: ServingConfig, prompts: list[Prompt], tokenizer=None) -> dict:
    """Measure every concurrency level in turn; returns {"model", "levels"} (JSON-ready)."""
    return asyncio.run(_run(config, prompts, tokenizer))
