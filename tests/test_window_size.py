"""The block-size controller: a probe is judged once, also when a fixed block runs it."""
from __future__ import annotations

import dataclasses

import pytest

from fastchat_cllm.core.window_size import PROBE_MIN, PROBE_SIZE, WindowSizer
from fastchat_cllm.core.jacobi import Blocks

ONE, PROBE = 0.05, 0.1    # seconds of a 1-token forward and of a probe-sized one


def test_a_probe_over_a_fixed_block_backs_off_once():
    sizer = WindowSizer(1, 16, adaptive=True, cost=None, device_type="cpu")
    for _ in range(30):                       # no guess is ever right: 1-token windows win
        sizer.observe(1, 1, ONE)
        sizer.observe(PROBE_SIZE, 1, PROBE)
    sizer.shadow(True)    # the free first-guess check held once: a probe could pay, window 2 not
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


def test_probes_run_only_when_the_free_first_guess_check_says_they_can_pay():
    """While windows are 1 the first guess is checked for free (`shadow`): when it never holds,
    no probe is paid for; when it holds, probes (and wider windows) come back."""
    def run(hit: bool) -> list[int]:
        sizer = WindowSizer(1, 16, adaptive=True, cost=None, device_type="cpu")
        sizes = []
        for _ in range(200):
            n = sizer.next_size(1000)
            sizes.append(n)
            if n == 1:
                sizer.shadow(hit)
            sizer.observe(n, n if hit else 1, ONE if n == 1 else 0.11)  # CPU: 2.2x for n > 1
        return sizes

    missing = run(hit=False)
    assert all(n == 1 for n in missing[5:]), missing[:20]        # after the first forwards
    holding = run(hit=True)
    assert sum(n > 1 for n in holding[5:]) > 150                  # guesses hold: wide windows


# --- windows for a batch: one price for the whole forward (issue 13) ---------------------------

import torch

from harness import tiny_model
from fastchat_cllm import JacobiConfig
from fastchat_cllm.core.engine import Engine
from fastchat_cllm.core.window_size import BatchCost, WindowSizer, choose_width


def curve(qs: list[float]) -> list[float]:
    """E[k | n] for n = 1..len(qs)+1 from per-guess acceptance rates."""
    out, expected, survive = [1.0], 1.0, 1.0
    for q in qs:
        survive *= q
        expected += survive
        out.append(expected)
    return out


def test_choose_width_prices_the_whole_forward():
    """One width for the batch's adaptive rows, chosen by their expected tokens over the price
    of the forward's rows at that width (the CPU's prior: a step at 2)."""
    cost = BatchCost("cpu")
    plain, cllm = curve([0.05] * 15), curve([0.95] * 15)
    assert choose_width([plain] * 8, [1] * 8, 0, 8, cost) == 1          # nothing to gain
    assert choose_width([cllm] * 8, [1] * 8, 0, 8, cost) >= 8           # guesses that hold pay
    assert choose_width([plain, plain], [1, 3], 0, 2, cost) == 3        # a row's smallest
    # a fixed-size row already makes the forward 4 wide: widths up to 4 cost the same, so the
    # scheduler gives every adaptive row max(width, 4) (its padding is free)
    assert choose_width([plain] * 3, [1] * 3, 4, 4, cost) <= 4
    # measured prices rule: when a wider forward costs no more, the width grows
    flat = BatchCost("cpu")
    for width in range(1, 17):
        flat.observe(4, width, 1.0)
    assert choose_width([curve([0.3] * 15)] * 4, [1] * 4, 0, 4, flat) == 16


def test_batch_cost_keeps_rows_and_width_apart():
    """c(rows, width) = c(rows) x g(width): a width measured at one row count prices it at
    another; g moves from its estimate by a moving average, is learnt only at row counts whose
    1-token cost is measured, never below 1, and a slow outlier cannot price a width out for
    good; forwards of one row (sized by their own request) are not observed."""
    cost = BatchCost("cpu")
    cost.observe(8, 1, 0.056)
    assert cost(8, 2) == pytest.approx(0.056 * 1.55)           # the prior step, unmeasured
    for _ in range(40):
        cost.observe(8, 2, 0.084)                               # measured: 1.5x
    assert cost(8, 2) == pytest.approx(0.084, rel=1e-3)
    cost.observe(6, 1, 0.050)
    assert cost(6, 2) == pytest.approx(0.050 * 1.5, rel=1e-3)
    for _ in range(40):
        cost.observe(1, 2, 0.5)                                 # a lone forward: ignored
        cost.observe(3, 2, 0.5)                                 # 3 rows at width 1 unmeasured
    assert cost(8, 2) == pytest.approx(0.084, rel=1e-3)
    for _ in range(40):
        cost.observe(8, 2, 0.001)                               # faster than width 1: g >= 1
    assert cost(8, 2) >= cost(8, 1)
    slow = BatchCost("cpu")
    slow.observe(8, 1, 0.056)
    slow.observe(8, 7, 20 * 0.056)                              # one forward 20x slow
    assert slow(8, 7) < 0.056 * 3                               # capped, and a moving average


def test_one_rows_lucky_window_does_not_widen_the_batch():
    """A row whose window of 2 was all right once (its guesses otherwise seldom hold) extends
    its own curve with its measured acceptance, not the prior, and does not force the batch
    wider: every row would pay for one row's luck (before, its smallest window became 3 and
    with 8 rows one of them almost always had such a window: a plain model's batch ran ~1.6
    wide and lost ~20% of its tokens per second)."""
    lucky = WindowSizer(1, 16, True, None, "cpu")
    for _ in range(20):
        lucky.shadow(False)
    lucky.observe(2, 2)                              # its window of 2 was all right
    assert lucky.batch_bounds(64) == (1, 16)
    curve_ = lucky.batch_curve(16)                   # position 3 priced like position 2 (poorly)
    assert curve_[2] < lucky.expected_tokens(16)[2]  # not at the prior
    others = [WindowSizer(1, 16, True, None, "cpu") for _ in range(7)]
    for sizer in others:
        for _ in range(20):
            sizer.shadow(False)
    cost = BatchCost("cpu")
    cost.observe(8, 1, 0.056)
    curves = [s.batch_curve(16) for s in [lucky, *others]]
    assert choose_width(curves, [1] * 8, 0, 8, cost) == 1
    # a row whose guesses keep holding extends its curve with that: the batch widens
    sure = WindowSizer(1, 16, True, None, "cpu")
    for _ in range(20):
        sure.shadow(True)
    sure.observe(2, 2)
    assert sure.batch_curve(16)[3] > 3 > sure.expected_tokens(16)[3]     # the prior: ~2.2


def test_a_batch_of_a_predictable_model_runs_wide_windows(one_thread):
    """A model whose argmax never changes (output head zeroed: token 0 forever) has every guess
    right: in a batch its windows widen within a few forwards, as far as the measured cost of
    wider forwards pays (a row all right extends its curve with its own acceptance)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = Engine(model, slots=3, max_len=256)
    run = engine.runner.run          # every forward takes the same time: the test pins the
    engine.runner.run = lambda rows: dataclasses.replace(run(rows), seconds=0.01)  # sizing
    ids = [engine.add([1, 5 + i, 9], JacobiConfig(max_new_tokens=120, window_size=16))
           for i in range(3)]
    sizes = {i: [] for i in ids}
    while engine.has_work:
        for request_id, step in engine.step():
            if step.window:
                assert step.accepted == len(step.window)
                sizes[request_id].append(len(step.window))
    for seq in sizes.values():     # windows all right: the batch widens within a few forwards
        body = seq[:-1]                # (the last is cut to the tokens left)
        assert body == sorted(body) and min(body[2:]) >= 7 and max(seq) >= 12, seq
