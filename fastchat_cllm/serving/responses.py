"""A streamed HTTP answer that is closed the moment it ends, however it ends.

Starlette's StreamingResponse leaves the body it streams to the garbage collector when a client
hangs up: the task that streams it is cancelled, and the generator (the worker's gate, which
holds an engine request; the API server's reading of a worker's answer, which holds the
connection to the worker) is closed only once nothing refers to it. The cancellation's
traceback can keep it in a reference cycle that only a full collection frees, and a request
whose client had hung up then decoded on: in 3 of 15 rounds of 10 hang-ups on the tiny test
model one request ran to its last token (tests/test_serving_batch.py). ClosingStream closes its
body as soon as the response is over (a sync body after the next() in flight has returned: the
worker's gate after its next Step), then calls `on_close` (the worker releases its place in
the semaphore), whether the closing went well or not.
"""
from __future__ import annotations

from typing import Callable, Optional

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStream(StreamingResponse):
    """A StreamingResponse of a generator (sync or async) that it closes when it is done."""

    def __init__(self, content, *, on_close: Optional[Callable[[], None]] = None, **kwargs):
        super().__init__(content, **kwargs)
        self.source, self.on_close = content, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:      # nothing runs the body now: a sync one's next() in flight was waited for
            try:
                with anyio.CancelScope(shield=True):
                    if hasattr(self.source, "aclose"):
                        await self.source.aclose()
                    elif hasattr(self.source, "close"):
                        self.source.close()
            finally:
                if self.on_close is not None:
                    self.on_close()
