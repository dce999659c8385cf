"""`python -m fastchat_cllm.serve` when a child dies or serve itself is killed (no model ever
answers here; the whole stack under SIGTERM is in test_serving_stack.py)."""
from __future__ import annotations

import os
import re

import pytest

from harness import wait_for

pytestmark = pytest.mark.slow


def test_serve_stops_all_when_a_child_dies(serve):
    """The suite's one check of `--window-size 0`: the worker refuses it in one line, exits
    with 2, and serve stops the others and says why."""
    served = serve("--window-size", "0")
    with served.explained():
        assert served.wait(300) == 1
        errors = "\n".join(served.errors)
        assert "worker exited with code 2" in errors
        assert "window_size must be in [1, 1024], got 0" in errors
        assert "stopped api, worker, controller" in "\n".join(served.lines)
    worker = served.log("worker")
    assert "window_size must be in [1, 1024], got 0" in worker
    assert "Traceback" not in worker and len(worker.splitlines()) <= 6, worker


def test_children_stop_when_serve_is_killed(serve):
    """SIGKILL gives serve no chance to stop its children: they get SIGTERM from the kernel."""
    served = serve()

    def started() -> list[int]:     # controller ready, worker and API server started
        pids = [int(p) for line in served.lines
                for p in re.findall(r"^started \w+ \(pid (\d+)", line)]
        return pids if len(pids) == 3 else []

    with served.explained():
        pids = wait_for(started, what="serve started three children", check=served.check_alive)
    served.process.kill()
    served.wait(30)

    def alive() -> list[int]:
        return [p for p in pids if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().split()[2] != "Z"]

    wait_for(lambda: not alive(), 60, "the children exit")
