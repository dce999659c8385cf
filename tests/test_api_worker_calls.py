"""The API server's non-streamed answers (openai_routes.Routes.generate_all): read from the
worker's stream, answered 503 when the worker cannot be reached, and given up (the worker's
stream closed) when the client hangs up first. Real sockets on loopback: a port nobody listens
on, and a worker that takes the request and never answers."""
from __future__ import annotations

import asyncio
import json
import socket
import time

from starlette.requests import Request

from fastchat_cllm.serving.openai_routes import Routes
from harness import free_ports


def client(hangs_up_after: float | None) -> Request:
    """The API client's request: one that hangs up after so many seconds, or one that waits."""
    start = time.monotonic()

    async def receive():
        if hangs_up_after is not None and time.monotonic() - start > hangs_up_after:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()
    return Request({"type": "http"}, receive)


def test_a_worker_that_cannot_be_reached_is_answered_503():
    worker = f"http://127.0.0.1:{free_ports(1)[0]}"            # nothing listens there
    contents, error = asyncio.run(Routes(None).generate_all([{"prompt": "Hi"}], worker,
                                                            client(None)))
    assert contents is None and error.status_code == 503
    assert json.loads(error.body)["code"] == 50005


def test_a_client_that_hung_up_closes_the_workers_streams():
    with socket.create_server(("127.0.0.1", 0)) as silent:     # takes requests, never answers
        worker = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        contents, error = asyncio.run(Routes(None).generate_all(
            [{"prompt": "Hi"}, {"prompt": "Ho"}], worker, client(hangs_up_after=1)))
        assert contents is None and error.status_code == 499
        assert time.monotonic() - started < 5
        silent.settimeout(5)
        closed = 0
        for _ in range(2):                  # both connections were made, then closed
            connection, _ = silent.accept()
            with connection:
                connection.settimeout(5)
                while connection.recv(65536):
                    pass                    # the request, then EOF: the API server closed it
                closed += 1
        assert closed == 2
