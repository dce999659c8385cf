"""Fixes for fschat 0.2.36 on current libraries. The request and response models are fixed in
FastChat's protocol module before the API server's module is imported (`fix_protocol`); the
launchers then build the stock apps explicitly and add the rest (launch.py).

1. transformers 5: get_context_length raises KeyError 'factor' (rope_scaling is always a dict).
2. pydantic 2: the API server's streaming `chunk.json(..., ensure_ascii=False)` raises TypeError.
3. The API server drops the worker's extra usage fields; keep the Jacobi statistics.
4. The web UI guesses a conversation template from the model name in its own process; it asks
   the worker that serves the model instead, as the API server does (web_ui.py).
5. The request models lack what current clients send and let bad input through to 500s
   (api_models.py).
6. A worker that died (the controller still lists it) makes the API server answer a bare 500;
   answer 503 with code 50005 naming the unreachable worker instead.
7. The chat and completions endpoints drop logprobs, seed, logit_bias and token-id prompts:
   openai_routes.py serves both.
(gradio >= 6 breaks the web UI: setup.cfg pins gradio < 6.)
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, ClassVar

from ..core.stats import tokens_per_forward
from . import api_models
from .stock import StockMismatch

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

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

    protocol.ChatCompletionStreamResponse.json = _json    # (completions: openai_routes.py)


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
            rate = tokens_per_forward(self.jacobi_tokens, self.jacobi_forwards)
            data["jacobi_tokens_per_forward"] = round(rate, 4)
            return data

    class ChatCompletionResponse(protocol.ChatCompletionResponse):
        usage: UsageInfo

    protocol.UsageInfo = UsageInfo
    protocol.ChatCompletionResponse = ChatCompletionResponse    # the stock /api/v1 chat route


def fix_protocol() -> None:
    """Fixes 2, 3, 5 and 7 in FastChat's protocol module; they must precede the import of the
    API server's module, which takes the request and response models by name."""
    from fastchat.protocol import openai_api_protocol as protocol

    fixed = getattr(protocol.ChatCompletionRequest, "checked", False)
    if "fastchat.serve.openai_api_server" in sys.modules and not fixed:
        raise StockMismatch("fastchat.serve.openai_api_server was imported before the protocol "
                           "fixes: its routes would drop logprobs, seed and the Jacobi usage")
    fix_streaming_json()
    keep_jacobi_usage()
    api_models.install()


def error_response(code: int, message: str, status: int) -> JSONResponse:
    """FastChat's error body {"object": "error", "message", "code"} with an HTTP status."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"object": "error", "message": message, "code": code}, status_code=status)


async def _worker_unreachable(request, exc):
    from fastchat.constants import ErrorCode

    message = f"the worker serving this model cannot be reached ({type(exc).__name__}: {exc})"
    return error_response(ErrorCode.CONTROLLER_NO_WORKER, message, 503)


def answer_unreachable_worker(app) -> None:
    """Give the API server's app the unreachable-worker handler."""
    import aiohttp
    import httpx

    for error in (aiohttp.ClientConnectionError, httpx.ConnectError):
        app.add_exception_handler(error, _worker_unreachable)
