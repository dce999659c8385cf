"""HumanEval pass@1 of a reply: its code extracted, the program built on the problem's stub, and
`check(entry_point)` run in a subprocess with a timeout and no network.

Not a security sandbox: the code is the model's own answer to a HumanEval problem. The check runs
in a fresh temp folder with resource limits, in a new network namespace when `unshare -rn`
works here, and always with Python's socket functions replaced by ones that refuse.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
NO_NETWORK = """import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval check")
for _name in ("connect", "connect_ex", "bind", "sendto"):
    setattr(_socket.socket, _name, _no_network)
_socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network, _name
"""
MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class Check:
    passed: bool
    result: str          # "passed", "timed out" or "failed: <last line of stderr>"


def extract_code(reply: str) -> str:
    """The code in a reply: the first fenced block that defines a function (else the first
    block; a last fence left open by the token limit counts), or the whole reply."""
    blocks = FENCE.findall(reply)
    defining = [b for b in blocks if re.search(r"^\s*def ", b, re.M)]
    return (defining or blocks or [reply])[0]


def build_program(stub: str, code: str, entry_point: str) -> str:
    """The reply's own `def entry_point` after the stub (whose imports and helpers it may use,
    and whose docstring-only function it replaces), or the stub completed by the reply."""
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return f"{stub}\n\n{code}"
    return stub + code


@functools.lru_cache(maxsize=None)
def network_namespace() -> list[str]:
    """`unshare -rn` (a new user and network namespace: no interface but loopback) when it works
    here, else [] (the socket guard alone)."""
    try:
        done = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["unshare", "-rn"] if done.returncode == 0 else []


def _limits(timeout: float) -> None:
    """In the child: memory, CPU time and file size bounded."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))


PASSED = "HUMANEVAL-CHECK-PASSED"


def _kill_group(process) -> bool:
    """SIGKILL the check's process group (it and anything it started); False if already gone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def run_check(program: str, test: str, entry_point: str, timeout: float = 10.0) -> Check:
    """Run `program`, the problem's `test` and `check(entry_point)` in a subprocess."""
    # passing is the marker printed after check(): an answer that exits 0 early does not pass
    source = (f"{NO_NETWORK}\n{program}\n\n{test}\n\ncheck({entry_point})\n"
              f"print({PASSED!r}, flush=True)\n")
    with tempfile.TemporaryDirectory(prefix="humaneval-") as folder:
        path = Path(folder) / "check.py"
        path.write_text(source, encoding="utf-8")
        argv = [*network_namespace(), sys.executable, "-I", str(path)]
        process = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={"PATH": os.environ.get("PATH", "")},
                                   start_new_session=True,
                                   preexec_fn=functools.partial(_limits, timeout))
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.communicate() if _kill_group(process) else None
            return Check(False, "timed out")
        _kill_group(process)                           # anything the answer left running
    if process.returncode == 0 and out.rstrip().endswith(PASSED):
        return Check(True, "passed")
    last = (err.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
    return Check(False, f"failed: {last[:200]}")


def pass_at_1(reply: str, problem: dict, timeout: float = 10.0) -> Check:
    """Check one reply to a held-out record (code_prompts.held_out_prompts: stub, test,
    entry_point)."""
    program = build_program(problem["stub"], extract_code(reply), problem["entry_point"])
    return run_check(program, problem["test"], problem["entry_point"], timeout)
