"""The block-size controller: a probe is judged once, also when a fixed block runs it."""
from __future__ import annotations

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
