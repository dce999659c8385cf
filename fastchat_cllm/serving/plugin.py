"""Register fastchat-cllm into FastChat: the adapter (first in line), the prompt formats, and
the transformers-5 context-length fix every FastChat model worker needs. Idempotent."""
from __future__ import annotations

from . import adapter, compat, templates


def register() -> None:
    templates.register_templates()
    adapter.install()
    compat.fix_context_length()
