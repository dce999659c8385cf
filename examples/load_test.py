"""Load test: N concurrent streaming chat requests through the OpenAI API of a running stack,
bounded in requests and time; prints TTFT and total latency percentiles and throughput.

    python -m fastchat_cllm.serve --dtype float32 --limit-worker-concurrency 8 &
    python examples/load_test.py --requests 64 --concurrency 64 --max-tokens 16
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import requests

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Count to five.",
             "What is 2 + 2?", "Say hello in Spanish.", "What is the largest ocean?"]


@dataclass(frozen=True)
class Outcome:
    ttft: float | None           # seconds to the first content delta
    total: float                 # seconds to the end of the stream
    deltas: int                  # content deltas streamed (one per --stream-interval tokens)
    error: str | None


def one_request(args: argparse.Namespace, question: str) -> Outcome:
    body = {"model": args.model, "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    started, ttft, deltas, error = time.monotonic(), None, 0, None
    try:
        with requests.post(f"{args.api}/chat/completions", json=body, headers=headers,
                           stream=True, timeout=args.timeout) as reply:
            if reply.status_code != 200:
                return Outcome(None, time.monotonic() - started, 0, reply.text[:200])
            for line in reply.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[len(b"data: "):])
                if "code" in chunk or "error" in chunk:
                    error = str(chunk)[:200]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.monotonic() - started
                        deltas += 1
    except requests.RequestException as e:
        error = f"{type(e).__name__}: {e}"
    return Outcome(ttft, time.monotonic() - started, deltas, error)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report(outcomes: list[Outcome], wall: float) -> str:
    ok = [o for o in outcomes if o.error is None]
    lines = [f"{len(outcomes)} requests, {len(ok)} ok, {len(outcomes) - len(ok)} failed, "
             f"wall {wall:.1f} s, {len(outcomes) / wall:.2f} requests/s"]
    for name, values in (("TTFT", [o.ttft for o in ok if o.ttft is not None]),
                         ("total", [o.total for o in ok])):
        if values:
            lines.append(f"{name:6s} p50 {percentile(values, 50):6.2f} s  p90 "
                         f"{percentile(values, 90):6.2f} s  p99 {percentile(values, 99):6.2f} s")
    lines.append(f"stream deltas/s (all requests): {sum(o.deltas for o in ok) / wall:.1f}")
    lines += [f"error: {o.error}" for o in outcomes if o.error][:5]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 1024:
        p.error("--requests must be in [1, 10000] and --concurrency in [1, 1024]")
    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one_request, args, QUESTIONS[i % len(QUESTIONS)])
                   for i in range(args.requests)]
        outcomes = [f.result() for f in as_completed(futures)]
    print(report(outcomes, time.monotonic() - started))
    return 0 if all(o.error is None for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
