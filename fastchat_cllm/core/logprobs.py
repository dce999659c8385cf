"""Log-probabilities of final tokens, as FastChat and OpenAI report them.

They are of the model's raw distribution, log_softmax(logits), before logit bias, temperature,
repetition penalty, top-p or top-k (FastChat's inference.py does the same): a token's logprob
does not depend on the settings that chose it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]   # the most likely (token, logprob) at its position, best first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int | None) -> list[TokenLogprob] | None:
    """Logprobs of `tokens`, token i drawn from row i; None when `top` is None (not asked for).

    logits: raw [L, V] with L >= len(tokens); top: how many alternatives to list per token.
    """
    if top is None:
        return None
    if not tokens:
        return []
    rows = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)             # [n, V]
    picked = rows.gather(1, torch.tensor(tokens, device=rows.device)[:, None])  # [n, 1]
    best = torch.topk(rows, min(top, rows.shape[-1]), dim=-1)                   # [n, top]
    pairs = zip(best.indices.tolist(), best.values.tolist())
    return [TokenLogprob(tok, value, tuple(zip(*pair)))
            for tok, value, pair in zip(tokens, picked[:, 0].tolist(), pairs)]
