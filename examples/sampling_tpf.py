"""Tokens per forward of Jacobi decoding under sampling next to greedy, on a few chat prompts.

python examples/sampling_tpf.py [--model smollm2-135m-instruct] [--max-new-tokens 96]
    [--window-size 16] [--temperature 0.7] [--top-p 0.9] [--seeds 3] [--threads 2]
    [--prompts held_out.jsonl [--limit 8]]

Runs every prompt greedily and with sampling (one run per seed, under each acceptance rule:
Gumbel noise fixed per position, and the textbook speculative rule), each with a fixed window of
--window-size positions (what acceptance allows) and with the adaptive engine (what it pays to
run), and prints tokens made final per forward and seconds per token. --prompts takes JSON lines
with a "prompt" field (e.g. a CLLM's held-out problems) instead of the 4 built-in chat prompts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastchat_cllm import jacobi_generate
from fastchat_cllm.chat_prompt import chat_prompt_ids
from fastchat_cllm.core.stats import tokens_per_forward
from fastchat_cllm.jsonl import read_jsonl
from fastchat_cllm.loading import load

PROMPTS = ("What is the capital of France? Answer in one sentence.",
           "Write a short poem about the sea.",
           "Explain what a binary search does, step by step.",
           "List three tips for staying focused while studying.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="alias or path (default: the bundled SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seeds", type=int, default=3, help="sampled runs per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", default=None, help='JSON lines with a "prompt" field')
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    return p.parse_args(argv)


def read_prompts(path: str | None, limit: int | None) -> list[str]:
    if path is None:
        return list(PROMPTS)[:limit]
    return [record["prompt"] for record in read_jsonl(path)][:limit]


def chat_ids(tokenizer, question: str) -> list[int]:
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])


def measure(model, ids, options: dict) -> tuple[int, int, float]:
    """(tokens made final by forwards, forwards, seconds per token) of one call."""
    started = time.perf_counter()
    out = jacobi_generate(model, ids, **options)
    seconds = time.perf_counter() - started
    return sum(out.stats.accepted_per_forward), out.stats.forwards, seconds / len(out.tokens)


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args.prompts, args.limit)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=torch.float32, device="cpu")
    base = dict(max_new_tokens=args.max_new_tokens, window_size=args.window_size,
                eos_token_id=tokenizer.eos_token_id)
    sampled = dict(temperature=args.temperature, top_p=args.top_p)
    runs = {"greedy": [dict()]}
    for rule in ("gumbel", "speculative"):
        runs[f"sampled, {rule}"] = [dict(sampled, seed=s, acceptance=rule)
                                    for s in range(args.seeds)]
    windows = {f"fixed window {args.window_size}": dict(adaptive=False), "adaptive": dict()}
    results = {(d, w): [] for d in runs for w in windows}
    for question in prompts:
        ids = chat_ids(tokenizer, question)
        for window, window_options in windows.items():       # interleaved: same machine load
            for decoding, variants in runs.items():
                for variant in variants:
                    results[decoding, window].append(
                        measure(model, ids, {**base, **window_options, **variant}))
    print(f"sampled: T={args.temperature}, top-p={args.top_p}; gumbel / speculative: the "
          f"acceptance rule (fastchat_cllm/core/sampling.py)")
    print(f"{'decoding':<24}{'window':<18}{'tokens/forward':>15}{'s/token':>10}{'runs':>6}")
    for (decoding, window), rows in results.items():
        tpf = tokens_per_forward(sum(r[0] for r in rows), sum(r[1] for r in rows))   # pooled
        print(f"{decoding:<24}{window:<18}{tpf:>15.3f}"
              f"{statistics.median(r[2] for r in rows):>10.3f}{len(rows):>6}")


if __name__ == "__main__":
    main()
