"""The baseline `jacobi-nocache`: Jacobi decoding that re-runs the prompt and block every iteration.

This is the scheme of FastChat's main branch (written here from its description, as a
baseline): a block of n random context tokens is iterated to its fixed point, each iteration a
full forward over prefix + block without a KV cache; the fixed point joins the prefix, EOS is
checked once per block. Greedy-exact, but every iteration pays for the whole prefix.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NocacheResult:
    tokens: list[int]
    forwards: int
    fast_forwarded: int   # right guesses made final beyond one token per forward
    stationary: int       # of those, guesses that kept their value since the forward before


@dataclass
class _Counts:
    forwards: int = 0
    fast_forwarded: int = 0
    stationary: int = 0


@torch.inference_mode()
def block_predictions(model, prefix: list[int], block: list[int]) -> list[int]:
    """Greedy prediction for each block position from one uncached forward over prefix + block."""
    ids = torch.tensor([prefix + block], device=model.device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(block) + 1).logits[0]
    return logits[:-1].argmax(-1).tolist()   # logits: [n + 1, V]; row i predicts block[i]


def common_prefix(a: list[int], b: list[int]) -> int:
    m = 0
    while m < len(a) and a[m] == b[m]:
        m += 1
    return m


def converge(model, prefix: list[int], block: list[int], counts: _Counts) -> list[int]:
    """Iterate `block` to its fixed point after `prefix`; returns the fixed point."""
    exact, previous = 0, None   # exact: leading block positions known to be final
    while True:
        new = block_predictions(model, prefix, block)
        counts.forwards += 1
        m = common_prefix(block, new)
        # new[:m + 1] is final (new[i] was predicted from block[:i] == new[:i]); at the fixed
        # point (m == n) the guesses block[exact:] are all right.
        final = min(m + 1, len(block))
        counts.fast_forwarded += max(final - exact - 1, 0)
        if previous is not None:
            counts.stationary += sum(1 for i in range(exact + 1, m) if previous[i] == block[i])
        if m == len(block):
            return block
        exact, previous, block = m + 1, block, new


def nocache_generate(model, input_ids: list[int], max_new_tokens: int, block_size: int,
                     eos_token_id: tuple[int, ...] = (), seed: int = 0) -> NocacheResult:
    """Greedy decoding, block by block, each block iterated to its fixed point without a cache."""
    rng = random.Random(seed)
    prefix, out, counts = list(input_ids), [], _Counts()
    while len(out) < max_new_tokens:
        n = min(block_size, max_new_tokens - len(out))
        block = converge(model, prefix, rng.choices(prefix, k=n), counts)
        prefix += block
        out += block
        stops = [i for i, tok in enumerate(block) if tok in eos_token_id]
        if stops:
            out = out[: len(out) - n + stops[0] + 1]
            break
    return NocacheResult(out, counts.forwards, counts.fast_forwarded, counts.stationary)
