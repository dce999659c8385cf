"""Sampling inside Jacobi decoding, exact in distribution, plus FastChat's logits processors.

Processing runs on every window position with that position's own prefix (the final text plus
window[:i+1]): first the logit bias (added to the raw logits, as OpenAI and transformers'
`sequence_bias` do), then FastChat's order: temperature, repetition penalty, top-p, top-k.
Greedy decoding with a bias or a repetition penalty takes the argmax of the processed logits.

Acceptance rule. Output position t draws Gumbel noise G_t [V] once, from a generator seeded with
`config.seed`, and its token is argmax(processed_t + G_t): the Gumbel-max trick, a sample from
softmax(processed_t). A guess g at t is accepted when it equals that sample, which, for a guess
chosen without looking at G_t (a fill), happens with probability p_t(g); on rejection the token
is the sample conditioned on not being g, i.e. drawn from p_t with g removed and renormalised:
the speculative-sampling rule for a deterministic draft. Acceptance stops at the first rejection;
when all guesses are accepted the last position's sample is the next token.
Because G_t belongs to the output position (not to the forward), carried guesses are the samples
of the previous forward with the same noise, so the loop is an ordinary Jacobi iteration of a
fixed map, and the output is the autoregressive sample for this seed whatever the window sizes,
the fill or the timing-driven adaptive window: seeded runs are reproducible.

`acceptance="speculative"` is the textbook form with fresh randomness in every forward: guess
i is accepted when u_i < p_{i-1}(guess) for a new uniform u_i; the first rejected position's
token is drawn from p_{i-1} with the guess removed; later positions get fresh samples as their
next guesses. Exact in distribution as well, but the text for a seed then depends on the window
sizes (which the adaptive controller picks from timings), and a carried guess is accepted only
with probability p(guess), where the coupled noise accepts it whenever the sample is unchanged.
"""
from __future__ import annotations

import torch

from .config import JacobiConfig
from .verify import Verdict, verify_greedy

TOP_P_CANDIDATES = 256   # tokens ranked before trying a full sort of the vocabulary


def penalize(scores: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty (CTRL, as transformers): divide positive scores, multiply negative ones.

    scores: [L, V]; present: [L, V] bool, the tokens of each position's prefix.
    """
    scaled = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(present, scaled, scores)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches `top_p` (at least one).

    scores: [L, V] -> [L, V] with dropped entries at -inf. Token of rank r (best first) stays
    when the tokens ranked above it hold less than `top_p` (transformers' rule, which sorts
    ascending); only the top of the ranking is sorted, growing until every row's cut is inside.
    """
    probs = scores.softmax(-1)
    vocab = scores.shape[-1]
    k = min(vocab, TOP_P_CANDIDATES)
    while True:
        best, order = probs.topk(k, dim=-1)                        # [L, k], descending
        keep = best.cumsum(-1) - best < top_p                       # mass above each rank
        if k == vocab or not keep[:, -1].any():
            break
        k = min(vocab, 4 * k)
    drop = torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, ~keep)
    return scores.masked_fill(drop, float("-inf"))


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest scores of each row (ties with the k-th kept). scores: [L, V]."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]   # [L, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def prefix_presence(seen: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Which tokens occur in each window position's prefix.

    seen: [V] bool (the final text); window: [L] ids -> [L, V] bool, row i = seen | window[:i+1].
    """
    size = window.shape[0]
    steps = torch.arange(size, device=window.device)
    upto = window[torch.minimum(steps[:, None], steps[None, :])]    # [L, L]: window[min(i, j)]
    rows = seen.expand(size, -1).clone()
    return rows.scatter_(1, upto, True)


def bias_vector(config: JacobiConfig, logits: torch.Tensor) -> torch.Tensor | None:
    """config.logit_bias as one row [V] for logits like `logits` [.., V]; None without a bias.

    At least float32 (transformers adds its float32 bias to float32 scores), so that a bias
    is not rounded to a half-precision step."""
    if not config.logit_bias:
        return None
    vocab = logits.shape[-1]
    ids, values = zip(*config.logit_bias)
    if ids[-1] >= vocab:                                  # ids are sorted
        raise ValueError(f"logit_bias token id {ids[-1]} is outside the vocabulary of {vocab}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    bias = torch.zeros(vocab, dtype=dtype, device=logits.device)
    bias[torch.tensor(ids, device=logits.device)] = torch.tensor(values, dtype=dtype,
                                                                 device=logits.device)
    return bias


def process_logits(logits: torch.Tensor, present: torch.Tensor | None, config: JacobiConfig,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The bias, then FastChat's processors, on each row.

    logits: [L, V]; present: [L, V] bool or None; bias: [V] from bias_vector(config, ..)."""
    if bias is not None:
        logits = logits.to(bias.dtype) + bias
    scores = logits / config.temperature if config.sampling else logits
    if config.repetition_penalty != 1.0:
        scores = penalize(scores, present, config.repetition_penalty)
    if config.sampling and config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    if config.sampling and config.top_k > 0:
        scores = top_k_filter(scores, config.top_k)
    return scores


def gumbel(generator: torch.Generator, size: int, device: torch.device) -> torch.Tensor:
    """One row of standard Gumbel noise [size], float64 so that no tail is cut off in practice."""
    uniform = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(uniform))


def verify_sampled(window: list[int], scores: torch.Tensor, noise: torch.Tensor) -> Verdict:
    """Accept guess i when it is the Gumbel-max sample at position i - 1.

    window: [L]; scores: processed logits [L, V]; noise: Gumbel [L, V] of the predicted positions.
    """
    return verify_greedy(window, scores + noise)


def resample_without(probs: torch.Tensor, guess: int, generator: torch.Generator) -> int:
    """A draw from probs [V] with `guess` removed and the rest renormalised."""
    residual = probs.clone()
    residual[guess] = 0
    return int(torch.multinomial(residual, 1, generator=generator))


def verify_speculative(window: list[int], scores: torch.Tensor,
                       generator: torch.Generator) -> Verdict:
    """The speculative-sampling rule with fresh randomness (see the module doc).

    window: [L]; scores: processed logits [L, V]. Accepted positions predict their guess; the
    first rejected one its resample; the rest (and the last, when all are accepted) a sample.
    """
    probs = scores.double().softmax(-1)                                        # [L, V]
    size = len(window)
    predictions = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
    guesses = torch.tensor(window[1:], device=probs.device)                    # [L - 1]
    chance = probs[:-1].gather(1, guesses[:, None])[:, 0]                      # p_{i-1}(g_i)
    uniform = torch.rand(size - 1, generator=generator, dtype=torch.float64,
                         device=probs.device)
    taken = (uniform < chance).tolist()
    k = 1 + (taken.index(False) if False in taken else size - 1)
    predictions[: k - 1] = window[1:k]
    if k < size:
        predictions[k - 1] = resample_without(probs[k - 1], window[k], generator)
    return Verdict(k, predictions[k - 1], predictions)


class SampledRule:
    """The acceptance rule of one call with processing: the final text's tokens and the noise
    of output positions not yet final. Row i of a verified window predicts output position
    `produced + i` (the prefill's one row predicts position 0)."""

    def __init__(self, config: JacobiConfig, prompt: torch.Tensor):
        self.config = config
        self.prompt = prompt                           # [P], until the vocabulary size is known
        self.seen: torch.Tensor | None = None          # [V] bool
        self.generator = torch.Generator(device=prompt.device).manual_seed(config.seed)
        self.noise: list[torch.Tensor] = []            # Gumbel rows for produced, produced + 1, ..
        self.bias: torch.Tensor | None = None          # [V], built at the first verify

    def presence(self, window: list[int], logits: torch.Tensor) -> torch.Tensor | None:
        """[L, V] bool: the tokens of each row's prefix; None without a repetition penalty."""
        if self.config.repetition_penalty == 1.0:
            return None
        if self.seen is None:
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self.seen[self.prompt] = True
        return prefix_presence(self.seen, torch.tensor(window, device=logits.device))

    def verify(self, window: list[int], logits: torch.Tensor) -> Verdict:
        """window: [L] ids, logits: raw [L, V] of one forward over it."""
        size, vocab = logits.shape
        if self.bias is None:
            self.bias = bias_vector(self.config, logits)
        scores = process_logits(logits, self.presence(window, logits), self.config, self.bias)
        if not self.config.sampling:
            return verify_greedy(window, scores)
        if self.config.acceptance == "speculative":
            return verify_speculative(window, scores, self.generator)
        while len(self.noise) < size:
            self.noise.append(gumbel(self.generator, vocab, logits.device))
        return verify_sampled(window, scores, torch.stack(self.noise[:size]))

    def commit(self, tokens: list[int]) -> None:
        """Record newly final tokens (in order)."""
        if self.seen is not None:
            self.seen[torch.tensor(tokens, device=self.seen.device)] = True
        del self.noise[: len(tokens)]


class GreedyRule:
    """Plain greedy decoding: the engine's exact greedy path, nothing to remember."""

    verify = staticmethod(verify_greedy)

    def commit(self, tokens: list[int]) -> None:
        pass


def acceptance_rule(config: JacobiConfig, prompt: torch.Tensor) -> GreedyRule | SampledRule:
    """The rule for `config`: plain greedy unless sampling, a repetition penalty or a logit
    bias is asked for.

    prompt: [P] ids on the model's device.
    """
    if config.sampling or config.repetition_penalty != 1.0 or config.logit_bias:
        return SampledRule(config, prompt)
    return GreedyRule()
