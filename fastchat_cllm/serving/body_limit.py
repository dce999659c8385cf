"""A request-body size limit for the API server: a body over the limit is answered 413 before
any of it is parsed or tokenized (FastChat reads and tokenizes whatever it is sent: a 20 MB
chat body kept the API server busy for 21 s before its 400)."""
from __future__ import annotations

import json

from fastchat.constants import ErrorCode

DEFAULT_MAX_BYTES = 4 << 20       # 4 MiB: ~100x a full 8k-token context as JSON text


class BodyLimit:
    """ASGI middleware: refuse an HTTP request whose body exceeds `max_bytes` with 413 (by its
    Content-Length when it has one, else as the body arrives)."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(send, int(length))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":          # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(send, size, "at least ")
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, send, size: int, bound: str = "") -> None:
        message = (f"the request body ({bound}{size} bytes) is over this server's limit of "
                   f"{self.max_bytes} bytes (--max-request-bytes)")
        payload = json.dumps({"object": "error", "message": message,
                              "code": ErrorCode.PARAM_OUT_OF_RANGE}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
