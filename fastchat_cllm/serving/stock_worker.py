"""FastChat's own `fastchat.serve.model_worker`, the reference the serving benchmark compares
ours with (`python -m fastchat_cllm.bench --compare-stock-worker`); run it as
`python -m fastchat_cllm.stock_worker FLAGS` (every stock flag).

Stock in everything that decodes: its loader (our adapter is taken out of FastChat's list), its
`generate_stream` (one request per thread, batch 1), its queue. Two things differ, set before its
module runs: transformers 5's context length (stock `get_context_length` raises KeyError
'factor', so it would not start), and the prompt format, which is the one our worker gives the
same --model-path (templates.py), so both workers decode the same prompts; --conv-template
still overrides it.
"""
from __future__ import annotations

import runpy

from fastchat.model import model_adapter

from .adapter import CllmAdapter


def main() -> None:
    model_adapter.model_adapters[:] = [a for a in model_adapter.model_adapters
                                       if not isinstance(a, CllmAdapter)]
    model_adapter.get_model_adapter.cache_clear()
    model_adapter.get_conversation_template = CllmAdapter().get_default_conv_template
    runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)
