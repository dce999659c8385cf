"""Fixes for fschat 0.2.36 on current libraries, applied to FastChat's own modules before a
launcher runs a stock front end (runpy re-imports names from these modules, so patching them
here reaches the re-executed copy).

1. transformers 5: get_context_length raises KeyError 'factor' (rope_scaling is always a dict).
2. pydantic 2: the API server's streaming `chunk.json(..., ensure_ascii=False)` raises TypeError.
3. The API server drops the worker's extra usage fields; keep the Jacobi statistics.
4. The web UI guesses a conversation template from the model name in its own process; ask the
   worker that serves the model instead, as the API server does.
(gradio >= 6 breaks the web UI: setup.cfg pins gradio < 6.)
"""
from __future__ import annotations

import logging
import sys
from typing import ClassVar

log = logging.getLogger(__name__)

# rope types whose max_position_embeddings already is the extended length
EXTENDED_ROPE = ("default", "llama3", "longrope")


def context_length(config) -> int:
    """fastchat.utils.get_context_length that also reads transformers-5 rope dicts."""
    from fastchat.utils import SEQUENCE_LENGTH_KEYS

    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = 1 if kind in EXTENDED_ROPE else scaling.get("factor") or 1
    for key in SEQUENCE_LENGTH_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            return int(factor * value)
    return 2048


def fix_context_length() -> None:
    import fastchat.utils

    original = fastchat.utils.get_context_length
    for module in list(sys.modules.values()):
        if getattr(module, "get_context_length", None) is original and module is not None:
            module.get_context_length = context_length
    fastchat.utils.get_context_length = context_length


def _json(self, *, ensure_ascii: bool = False, **kwargs) -> str:
    """pydantic-1 style `.json(ensure_ascii=...)` on pydantic 2 (which writes UTF-8 as is)."""
    return self.model_dump_json(**kwargs)


def fix_streaming_json() -> None:
    from fastchat.protocol import openai_api_protocol as protocol

    for cls in (protocol.ChatCompletionStreamResponse, protocol.CompletionStreamResponse):
        cls.json = _json


def keep_jacobi_usage() -> None:
    """Let usage carry the worker's Jacobi counts through the API server's response models.

    The server sums every usage field over the n choices, so the counts are fields and
    tokens per forward is recomputed from the sums when the response is written."""
    from pydantic import model_serializer

    from fastchat.protocol import openai_api_protocol as protocol

    if getattr(protocol.UsageInfo, "jacobi", False):
        return

    class UsageInfo(protocol.UsageInfo):
        jacobi: ClassVar[bool] = True
        jacobi_forwards: int = 0
        jacobi_tokens: int = 0
        jacobi_tokens_per_forward: float = 0.0

        @model_serializer(mode="wrap")
        def _with_rate(self, handler):
            data = handler(self)
            if not self.jacobi_forwards:     # not a Jacobi worker: plain OpenAI usage
                return {k: v for k, v in data.items() if not k.startswith("jacobi_")}
            data["jacobi_tokens_per_forward"] = round(self.jacobi_tokens / self.jacobi_forwards, 4)
            return data

    class ChatCompletionResponse(protocol.ChatCompletionResponse):
        usage: UsageInfo

    class CompletionResponse(protocol.CompletionResponse):
        usage: UsageInfo

    protocol.UsageInfo = UsageInfo
    protocol.ChatCompletionResponse = ChatCompletionResponse
    protocol.CompletionResponse = CompletionResponse


def worker_conversation(controller_url: str, model_name: str):
    """The conversation template of the worker serving `model_name` (as the API server builds
    it from /worker_get_conv_template)."""
    import requests
    from fastchat.conversation import Conversation, SeparatorStyle

    address = requests.post(controller_url + "/get_worker_address", json={"model": model_name},
                            timeout=10).json()["address"]
    if not address:
        raise LookupError(f"no worker serves {model_name}")
    conv = requests.post(address + "/worker_get_conv_template", json={"model": model_name},
                         timeout=10).json()["conv"]
    return Conversation(name=conv["name"], system_template=conv["system_template"],
                        system_message=conv["system_message"], roles=tuple(conv["roles"]),
                        messages=[list(m) for m in conv["messages"]], offset=conv["offset"],
                        sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"],
                        sep2=conv["sep2"], stop_str=conv["stop_str"],
                        stop_token_ids=conv["stop_token_ids"])


def web_ui_asks_worker(controller_url: str) -> None:
    """Make the web UI take each model's template from its worker (FastChat's own guess from
    the name stays the fallback, e.g. for API-provider models)."""
    import requests
    from fastchat.model import model_adapter

    guess = model_adapter.get_conversation_template

    def get_conversation_template(model_name: str):
        try:
            return worker_conversation(controller_url, model_name)
        except (requests.RequestException, LookupError, KeyError, ValueError) as e:
            log.warning("template of %s from its worker failed (%s); guessing", model_name, e)
            return guess(model_name)

    model_adapter.get_conversation_template = get_conversation_template
