"""The block-size controller: a probe is judged once, also when a fixed block runs it."""
from __future__ import annotations

import pytest

from fastchat_cllm.core.window_size import PROBE_MIN, PROBE_SIZE, WindowSizer
from fastchat_cllm.core.jacobi import Blocks

ONE, PROBE = 0.05, 0.1    # seconds of a 1-token forward and of a probe-sized one


def test_a_probe_over_a_fixed_block_backs_off_once():
    sizer = WindowSizer(1, 16, adaptive=True, cost=None, device_type="cpu")
    for _ in range(30):                       # no guess is ever right: 1-token windows win
        sizer.observe(1, 1, ONE)
        sizer.observe(PROBE_SIZE, 1, PROBE)
    blocks = Blocks(fixed=True, window_size=16)
    size, fresh = blocks.next_size(sizer, 1000)
    for _ in range(PROBE_MIN - 1):           # 1-token blocks until the probe is due
        assert (size, fresh) == (1, True)
        sizer.observe(size, 1, ONE)
        assert blocks.accepted(1) == 1
        size, fresh = blocks.next_size(sizer, 1000)
    assert (size, fresh) == (PROBE_SIZE, True) and sizer.probing
    forwards = 0
    while True:                              # the probe block: one token accepted a forward
        sizer.observe(size, 1, PROBE)
        forwards += 1
        if blocks.accepted(1) is not None:
            break
        size, fresh = blocks.next_size(sizer, 1000)
        assert not fresh
    assert forwards == PROBE_SIZE
    assert sizer.probe_every == 2 * PROBE_MIN and not sizer.probing   # backed off once


# --- windows for a batch: one price for the whole forward (issue 13) ---------------------------

import itertools
import random

import torch

from harness import tiny_model
from fastchat_cllm import JacobiConfig
from fastchat_cllm.core.engine import Engine
from fastchat_cllm.core.window_size import ForwardCost, allocate


def curve(qs: list[float]) -> list[float]:
    """E[k | n] for n = 1..len(qs)+1 from per-guess acceptance rates."""
    out, expected, survive = [1.0], 1.0, 1.0
    for q in qs:
        survive *= q
        expected += survive
        out.append(expected)
    return out


def rate(curves, sizes, fixed, cost) -> float:
    return sum(c[n - 1] for c, n in zip(curves, sizes)) / cost(fixed + sum(sizes))


def envelope(cost, start: int):
    """The price allocate uses: measured costs made non-decreasing from `start` positions on."""
    return lambda total: max(cost(t) for t in range(start, total + 1))


def test_allocate_finds_the_best_split_of_every_forward():
    """Against brute force over every combination of windows, for random acceptance curves,
    lower bounds and measured-looking costs (with the CPU's step at 2 positions)."""
    rng = random.Random(0)
    for trial in range(200):
        rows = rng.randint(1, 3)
        curves = [curve([rng.random() ** rng.choice((0.3, 1, 3)) for _ in range(rng.randint(0, 5))])
                  for _ in range(rows)]
        lows = [rng.randint(1, len(c)) for c in curves]
        fixed = rng.choice((0, 0, 7))
        cost = ForwardCost("cpu", slope=rng.choice((0.005, 0.05, 0.3)))
        for n in rng.sample(range(1, 20), 3):
            cost.observe(n, cost.prior(n) * rng.uniform(0.9, 1.1))
        got = allocate(curves, lows, fixed, cost)
        assert all(low <= n <= len(c) for low, n, c in zip(lows, got, curves))
        price = envelope(cost, fixed + sum(lows))
        best = max(rate(curves, sizes, fixed, price) for sizes in itertools.product(
            *[range(low, len(c) + 1) for low, c in zip(lows, curves)]))
        assert rate(curves, got, fixed, price) == pytest.approx(best, rel=1e-12), trial


def test_allocate_gives_windows_where_they_pay():
    cost = ForwardCost("cpu")
    plain, cllm = curve([0.05] * 15), curve([0.95] * 15)
    assert allocate([plain] * 4, [1] * 4, 0, cost) == [1, 1, 1, 1]     # nothing to gain
    assert min(allocate([cllm] * 4, [1] * 4, 0, cost)) >= 14            # cheap positions pay
    sizes = allocate([plain, cllm], [1, 1], 0, cost)
    assert sizes[0] == 1 and sizes[1] > 8
    assert allocate([plain, cllm], [8, 1], 0, cost)[0] == 8            # a due probe is kept


def test_batch_probes_are_one_guess_and_back_off():
    """In a batch a plain request probes with one guess (2 positions), and a probe whose guess
    fails doubles the wait before the next, as probes alone do."""
    from fastchat_cllm.core.window_size import BATCH_PROBE

    sizer = WindowSizer(1, 16, adaptive=True, cost=None, device_type="cpu")
    lows = []
    for _ in range(PROBE_MIN * 7):
        low, high = sizer.batch_bounds(1000)
        assert high == 16
        lows.append(low)
        sizer.observe(low, 1)                   # a batched forward: no seconds; guess wrong
    probes = [i for i, low in enumerate(lows) if low > 1]
    assert all(lows[i] == BATCH_PROBE for i in probes)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == [2 * PROBE_MIN, 4 * PROBE_MIN], gaps


def test_a_batch_of_a_predictable_model_runs_wide_windows(one_thread):
    """A model whose argmax never changes (output head zeroed: token 0 forever) has every guess
    right: in a batch the engine gives each request windows as wide as it may."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = Engine(model, slots=3, max_len=256)
    ids = [engine.add([1, 5 + i, 9], JacobiConfig(max_new_tokens=120, window_size=16))
           for i in range(3)]
    sizes = {i: [] for i in ids}
    while engine.has_work:
        for request_id, step in engine.step():
            if step.window:
                assert step.accepted == len(step.window)
                sizes[request_id].append(len(step.window))
    for seq in sizes.values():     # each window all right: the next one is wider, up to 16
        assert seq[:-1] == sorted(seq[:-1]) and max(seq) >= 15, seq
