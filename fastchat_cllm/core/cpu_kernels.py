"""The package's C++ CPU kernels (core/kernels/*.cpp), built for this CPU at first use and
loaded as torch ops in the namespace fastchat_cllm_cpu:

- q4_linear, q8_linear: linear layers on a GGUF file's blocks (gguf_linear.py);
- packed_attention: the engine's attention over its slot cache (engine/runner.py);
- low_rank: a LoRA delta row by row (gguf_linear.GGUFLinear).

The build (~30 s, once per CPU and source: torch's extension folder keeps it) uses torch's
cpp_extension with -march=native; where it fails (no compiler) `load` raises KernelError and
the callers run their torch fallbacks, saying so in one line.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = ("gguf_linear.cpp", "attention.cpp", "low_rank.cpp")
log = logging.getLogger(__name__)
_loaded: list = []
_failed: list = []
_lock = threading.Lock()


class KernelError(RuntimeError):
    """The kernels could not be built or loaded here (no compiler, ...)."""


def cpu_tag() -> str:
    """What a build for this CPU depends on (-march=native): its model and flags, hashed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines()
                 if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


def load() -> None:
    """Build (first use) and load the kernels, their ops registered with shape functions for
    torch.compile. KernelError when they cannot be (remembered: not tried again)."""
    with _lock:
        _load()


def _load() -> None:
    if _loaded:
        return
    if _failed:
        raise KernelError(_failed[0])
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name=f"fastchat_cllm_cpu_{cpu_tag()}",
                           sources=[str(KERNELS / name) for name in SOURCES],
                           is_python_module=False, verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except Exception as e:       # a compiler missing or failing: said in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _failed.append(f"cannot build the CPU kernels ({', '.join(SOURCES)}): {first}")
        log.warning("%s; running torch's own ops instead", _failed[0])
        raise KernelError(_failed[0]) from e
    for op in ("q4_linear", "q8_linear"):
        torch.library.register_fake(f"fastchat_cllm_cpu::{op}")(_linear_shape)
    torch.library.register_fake("fastchat_cllm_cpu::packed_attention")(_attention_shape)
    torch.library.register_fake("fastchat_cllm_cpu::low_rank")(_low_rank_shape)
    _loaded.append(True)


def available() -> bool:
    """Whether the kernels are loaded, loading them if they can be."""
    try:
        load()
    except KernelError:
        return False
    return True


def _linear_shape(x, qs, d, m=None):
    return x.new_empty(x.shape[0], qs.shape[0])


def _low_rank_shape(x, a, bt):
    return x.new_empty(x.shape[0], bt.shape[1])


def _attention_shape(query, key, value, meta, mask, scale):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
