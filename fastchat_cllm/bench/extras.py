"""Optional packages some benchmark runs need, asked for by the extra that installs them."""
from __future__ import annotations

import importlib

INSTALL = "pip install 'fastchat-cllm[bench]'"


class MissingExtra(ImportError):
    """An optional package is missing; the message is one line saying what to install."""


def need(module: str, purpose: str):
    """Import `module`, or raise MissingExtra naming `purpose` and the bench extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise MissingExtra(f"{purpose} needs the {module.split('.')[0]} package: {INSTALL}") \
            from None
