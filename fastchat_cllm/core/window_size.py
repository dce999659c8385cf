"""Adaptive window size: pick the window that maximises expected tokens per second of forward.

Model: a forward over n positions costs c(n) seconds and finalises k tokens, where k - 1 is the
number of leading guesses that turn out right. With q_i = P(guess i right | guesses 1..i-1
right), E[k | n] = sum_{i<n} prod_{j<=i} q_j. Each q_i is a forgetting average over the forwards
that reached guess i (unseen positions take the prior; in a batch, those past a window that was
all right take the last one seen), so a window that stops paying shrinks
within a few forwards. When small windows win, a larger one is still probed now and then, with
exponential back-off while probes do not pay, so a model (or a stretch of text) that becomes
predictable is noticed at a bounded cost. While windows are 1, the guess a window of 2 would have
carried is still checked against the token that arrives (`shadow`, free), and a probe runs only
when that first guess holds often enough for a probe to pay.

c(n) is measured as the engine runs (a moving average per size, `ForwardCost`); sizes not yet run
are priced from the nearest measured size through a prior shape.

In a batch the cost driver is the whole forward: the engine prices forwards of windows with a
`BatchCost` (seconds by rows and widest window), and
`choose_width` picks the width that maximises the batch's expected tokens per second, each
request's E[k | n] coming from its own sizer (`batch_curve`). A batch whose guesses are seldom
right runs width 1: it does not pay for positions it cannot use. On CPU the cost has a step:
BLAS runs a 1-token forward as matrix-vector products and any n >= 2 as matrix-matrix products,
which on the 2-core machines here cost ~2x for one row of 2 tokens and ~1.45x for 8 rows of 2
against 8 rows of 1 (SmolLM2-135M, fp32). A request alone on the engine's compiled step
("cpu-compiled") has no such step: it runs a one-token step as two tokens, and one row of 4 cost
1.04x one of 2 (a batch's forward, priced by BatchCost, still has one: ~1.3x for 8 rows of 2).
An eager step on prepacked weights ("cpu-packed", packed_linear) keeps a small one: one row of
2 / 4 / 16 tokens cost ~1.0-1.1x / 1.05x / 1.4x one of 1.
"""
from __future__ import annotations

# Prior shape of c(n) / c(1): a step for leaving matrix-vector products (CPU only) plus a slope
# per extra position. GPUs stay flat for far longer windows.
PRIOR_STEP = {"cpu": 0.5, "cpu-packed": 0.05}
PRIOR_SLOPE = {"cpu": 0.05, "cpu-compiled": 0.05, "cpu-packed": 0.025}
GPU_SLOPE = 0.005
PRIOR_Q, PRIOR_WEIGHT, DECAY, COST_EMA = 0.3, 1.0, 0.8, 0.3
PROBE_MIN, PROBE_MAX, PROBE_SIZE = 8, 128, 8
G_CAP, MIN_SECONDS = 3.0, 1e-6
UNSEEN = 0.5          # batch_curve: a guess with fewer (forgetting) trials counts as unseen      # BatchCost: a sample's cap over its estimate; a time's floor


class ForwardCost:
    """c(n), the seconds of a forward over n positions: measured (a moving average per n) and,
    for an n not yet run, the nearest measured n scaled by the prior shape."""

    def __init__(self, device_type: str, slope: float | None = None):
        self.step = PRIOR_STEP.get(device_type, 0.0)
        self.slope = slope if slope is not None else PRIOR_SLOPE.get(device_type, GPU_SLOPE)
        self.seconds: dict[int, float] = {}

    def prior(self, n: int) -> float:
        return 1.0 + (self.step if n > 1 else 0.0) + self.slope * (n - 1)

    def __call__(self, n: int) -> float:
        if n in self.seconds:
            return self.seconds[n]
        if not self.seconds:
            return self.prior(n)
        m = min(self.seconds, key=lambda size: (abs(size - n), size))
        return self.seconds[m] * self.prior(n) / self.prior(m)

    def observe(self, n: int, seconds: float) -> None:
        old = self.seconds.get(n)
        self.seconds[n] = seconds if old is None else old + COST_EMA * (seconds - old)


class BatchCost:
    """Seconds of a forward of `rows` windows up to `width` wide, as c(rows) x g(width): c is the
    cost of 1-token windows by row count, g(width) >= 1 the factor a wider window multiplies it
    by. c is a moving average per row count (an unmeasured count: the nearest measured one
    through ForwardCost's prior shape). g(w) is learnt only from forwards whose row count has
    a measured c, starting from its estimate (the prior's step where nothing wider was seen)
    and moving by COST_EMA, each sample capped at G_CAP x that estimate, so one slow forward
    cannot price a width out for good. Rows and width are kept apart because the cost is not a
    function of rows x width alone: on CPU 8 rows of 1 token cost ~1.4x one row of 1, 8 rows
    of 2 another ~1.45x, one row of 2 ~2x one row of 1. Forwards of one row (a request sizing
    its own window) are not observed here."""

    def __init__(self, device_type: str):
        self.narrow = ForwardCost(device_type)      # rows -> seconds of 1-token windows
        self.factor = ForwardCost(device_type)      # width -> g(width)
        self.factor.observe(1, 1.0)

    def observe(self, rows: int, width: int, seconds: float) -> None:
        seconds = max(seconds, MIN_SECONDS)
        if rows < 2:
            return
        if width == 1:
            self.narrow.observe(rows, seconds)
        elif not self.narrow.seconds:       # no scale yet: this forward sets it
            self.narrow.observe(rows, seconds / self.factor(width))
        elif rows in self.narrow.seconds:
            estimate = self.factor(width)
            sample = min(max(seconds / self.narrow(rows), 1.0), G_CAP * estimate)
            self.factor.seconds[width] = estimate + COST_EMA * (sample - estimate)

    def __call__(self, rows: int, width: int) -> float:
        return self.narrow(rows) * (1.0 if width == 1 else self.factor(width))


def choose_width(curves: list[list[float]], lows: list[int], fixed: int, rows: int,
                 cost) -> int:
    """The width of a forward of windows with the best expected final tokens per second.

    curves[r][n - 1]: E[k | n] of adaptive row r for n = 1 .. its largest window; lows[r]: its
    smallest window; fixed: the widest window of the forward's other rows (0: none); rows: all
    its rows; cost(rows, width) -> seconds (a BatchCost, priced by rows and widest window).
    An adaptive row runs min(max(width, fixed), its largest)."""
    top = max(len(curve) for curve in curves)
    start = min(top, max([1, *lows]))
    best, best_rate = start, -1.0
    for width in range(start, top + 1):
        gain = sum(curve[min(max(width, fixed), len(curve)) - 1] for curve in curves)
        rate = gain / cost(rows, max(width, fixed))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


class WindowSizer:
    def __init__(self, low: int, high: int, adaptive: bool, cost: float | None, device_type: str):
        self.low, self.high, self.adaptive = low, high, adaptive
        self.costs = ForwardCost(device_type, cost)   # c(n) of this request's lone forwards
        self.hits = [0.0] * high    # hits[i]: forgetting count of forwards where guess i was right
        self.trials = [0.0] * high  # trials[i]: ... of forwards that reached guess i
        self.probe_every, self.since_probe, self.probing = PROBE_MIN, 0, False
        self.outgrown = 0      # a window >= 2 all right: alone, try one more; in a batch, batch_curve

    def expected_tokens(self, high: int, unseen_from: int | None = None) -> list[float]:
        """E[k | n] for n = 1..high (index n - 1); with `unseen_from`, a guess from there on that
        no forward has reached takes the acceptance of guess unseen_from - 1 (see batch_curve)."""
        out, expected, survive = [], 0.0, 1.0
        for n in range(1, high + 1):
            if n > 1:
                i = n - 1
                if unseen_from is not None and i >= unseen_from and self.trials[i] < UNSEEN:
                    i = unseen_from - 1
                survive *= (self.hits[i] + PRIOR_Q * PRIOR_WEIGHT) / (self.trials[i] + PRIOR_WEIGHT)
            expected += survive
            out.append(expected)
        return out

    def expected_rates(self, high: int) -> list[float]:
        """E[k | n] / c(n) for n = 1..high (index n - 1)."""
        return [e / self.cost(n) for n, e in enumerate(self.expected_tokens(high), start=1)]

    def batch_bounds(self, cap: int) -> tuple[int, int]:
        """(smallest, largest) window the engine may give this request in a batch, at most `cap`.
        There are no probes in a batch (a probe would widen every row): acceptance is learnt
        whenever the batch's width is >= 2. A window that was all right does not raise the
        smallest (every row would pay for one row's luck); it extends `batch_curve` instead."""
        high = max(1, min(self.high, cap))
        if not self.adaptive:
            return high, high
        return min(self.low, high), high

    def batch_curve(self, high: int) -> list[float]:
        """E[k | n] for n = 1..high as a batch prices it: positions past a window whose every
        guess held, where no forward has reached, take the acceptance of the last one seen
        instead of the prior. Guesses that keep holding widen the batch; a plain model's lucky
        window (its first guess right one time in ten) adds a tenth of a token, widening nothing."""
        return self.expected_tokens(high, unseen_from=self.outgrown or None)

    def next_size(self, cap: int) -> int:
        """The window for the next forward, at most `cap` (tokens left to generate)."""
        high = max(1, min(self.high, cap))
        if not self.adaptive:
            return high
        low = min(self.low, high)
        if self.outgrown:       # positions past a window that was all right are still unseen
            low = max(low, min(high, self.outgrown + 1))
        rates = self.expected_rates(high)
        best = max(range(low, high + 1), key=lambda n: rates[n - 1])
        self.since_probe += 1
        self.probing = (best < min(high, PROBE_SIZE) and self.since_probe >= self.probe_every
                        and self.probe_can_pay(min(high, PROBE_SIZE)))
        if self.probing:
            self.since_probe = 0
            return min(high, PROBE_SIZE)
        return best

    def probe_can_pay(self, n: int) -> bool:
        """Whether a probe of n positions could pay even if every guess after the first held:
        the first guess's rate (learnt for free by `shadow` while windows are 1) must be high
        enough. A plain model's first guess seldom holds, so it stops paying for probes."""
        q1 = (self.hits[1] + PRIOR_Q * PRIOR_WEIGHT) / (self.trials[1] + PRIOR_WEIGHT)
        return (1.0 + q1 * (n - 1)) / self.cost(n) > 1.0 / self.cost(1)

    def shadow(self, hit: bool) -> None:
        """Record, at no cost, whether the guess a window of 2 would have carried held (checked
        against the token a 1-token forward then made)."""
        if self.high >= 2:
            self.trials[1] = self.trials[1] * DECAY + 1.0
            self.hits[1] = self.hits[1] * DECAY + (1.0 if hit else 0.0)

    def cost(self, n: int) -> float:
        """c(n): measured, else the nearest measured size scaled by the prior shape."""
        return self.costs(n)

    def observe(self, window: int, accepted: int, seconds: float | None = None,
                sized: bool = True) -> None:
        """Record a forward over `window` positions that took `seconds` (None: a batched forward,
        whose time is not this window's) and finalised `accepted`. `sized` False: a prompt
        lookup grew the window past this sizer's choice, so only its cost is learnt (its
        copied guesses say little of the next window's, and all right would force the next one
        as wide)."""
        if seconds is not None:
            self.costs.observe(window, seconds)
        if not sized:
            self.outgrown, self.probing = 0, False
            return
        self.outgrown = window if window >= 2 and accepted >= window else 0
        for i in range(1, min(window, accepted + 1)):
            self.trials[i] = self.trials[i] * DECAY + 1.0
            self.hits[i] = self.hits[i] * DECAY + (1.0 if accepted > i else 0.0)
        if self.probing:   # judged once: a fixed block runs its probe over several forwards
            paid = accepted / self.cost(window) > 1.0 / self.cost(1)
            self.probe_every = PROBE_MIN if paid else min(2 * self.probe_every, PROBE_MAX)
            self.probing = False
