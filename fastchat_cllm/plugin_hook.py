"""Arm the FastChat plugin on `import fastchat_cllm` without importing FastChat.

When fastchat is installed, the plugin registers itself as soon as
`fastchat.model.model_adapter` has been imported (at once if it already was), so
`import fastchat_cllm` costs nothing extra for the core, training and benchmarks
(importing FastChat's adapters takes seconds), and a process that never touches FastChat
never loads it. This module must not import fastchat; `fastchat_cllm.serving` imports
FastChat's adapters before any of its modules runs, so the registration the import sets off never
meets a half-imported serving module.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "fastchat.model.model_adapter"


def _register() -> None:
    from .serving.plugin import register

    register()


class _Loader(importlib.abc.Loader):
    """Wraps the target's loader: execute the module, then register the plugin."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name):   # get_source, get_code, ... for tracebacks and tools
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """One-shot finder that hands the target's spec back with the wrapping loader."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def arm() -> None:
    """Register the plugin now if FastChat's adapters are loaded, or when they get loaded."""
    try:
        installed = importlib.util.find_spec("fastchat") is not None
    except (ImportError, ValueError):   # a broken or deliberately blocked fastchat
        installed = False
    if not installed:
        return
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
