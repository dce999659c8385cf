"""responses.ClosingStream, which streams the worker's answers (a sync generator, the gate, run
in Starlette's thread pool) and the API server's (an async generator): a client that hangs up
closes the generator at once, and on_close runs (the worker: its slot is released). A real
uvicorn server on loopback, with the garbage collector off while a test runs, so that nothing
but the response can have closed the generator: Starlette's own StreamingResponse leaves it to
a collection, and a hung-up request decoded on (tests/test_serving_batch.py). A client that
stops reading before it hangs up (the response waits in send() with the generator at a yield,
a case a live server rarely reaches) is driven through the ASGI calls themselves."""
from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
import requests
import uvicorn
from fastapi import FastAPI

from fastchat_cllm.serving.responses import ClosingStream
from harness import free_ports, wait_for

CHUNK = b"x" * 16


class Body:
    """One request's generator: `chunks` chunks (None: endless), and what happened to it."""

    def __init__(self, chunks: int | None):
        self.chunks, self.sent = chunks, 0
        self.closed, self.released = threading.Event(), threading.Event()

    def more(self) -> bool:
        return self.chunks is None or self.sent < self.chunks

    def sync(self):
        try:
            while self.more():
                time.sleep(0.005)
                self.sent += 1
                yield CHUNK
        finally:
            self.closed.set()

    async def asynchronous(self):
        try:
            while self.more():
                await asyncio.sleep(0.005)
                self.sent += 1
                yield CHUNK
        finally:
            self.closed.set()


@pytest.fixture(scope="module")
def server():
    app, bodies = FastAPI(), {}

    @app.get("/{kind}/{name}")
    async def stream(kind: str, name: str, chunks: int | None = None):
        body = bodies[name] = Body(chunks)
        source = body.sync() if kind == "sync" else body.asynchronous()
        return ClosingStream(source, on_close=body.released.set)

    port = free_ports(1)[0]
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    wait_for(lambda: served.started, 30, "the test server listening")
    yield f"http://127.0.0.1:{port}", bodies
    served.should_exit = True
    thread.join(30)


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_hanging_up_closes_the_generator_at_once(server, no_gc, kind):
    url, bodies = server
    with requests.get(f"{url}/{kind}/hung-{kind}", stream=True, timeout=30) as reply:
        chunks = reply.iter_content(len(CHUNK))
        assert next(chunks) == CHUNK and next(chunks) == CHUNK
    body = bodies[f"hung-{kind}"]
    assert body.closed.wait(10), f"the generator runs on: {body.sent} chunks sent"
    assert body.released.wait(10)
    sent = body.sent
    time.sleep(0.1)
    assert body.sent == sent                     # and it stays stopped


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_answer_read_to_its_end_is_whole_and_releases_once(server, no_gc, kind):
    url, bodies = server
    reply = requests.get(f"{url}/{kind}/whole-{kind}", params={"chunks": 20}, timeout=30)
    assert reply.content == CHUNK * 20
    body = bodies[f"whole-{kind}"]
    assert body.closed.wait(10) and body.released.wait(10) and body.sent == 20


async def stop_reading_and_hang_up(response: ClosingStream) -> None:
    """Drive `response` through ASGI as a client that reads one chunk, then stops reading (the
    response waits in send()) and hangs up."""
    first_sent = asyncio.Event()

    async def send(message):
        if message["type"] == "http.response.body":
            first_sent.set()
            await asyncio.Event().wait()            # the client reads no more

    async def receive():
        await first_sent.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await asyncio.wait_for(response(scope, receive, send), 10)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_that_stops_reading_and_hangs_up_gets_the_generator_closed(no_gc, kind):
    body = Body(None)
    source = body.sync() if kind == "sync" else body.asynchronous()

    async def respond():
        await stop_reading_and_hang_up(ClosingStream(source, on_close=body.released.set))
        return body.closed.is_set()     # now: asyncio.run's end closes what is left open

    assert asyncio.run(respond()), "the generator was left open"
    assert body.released.is_set() and body.sent == 1


def test_on_close_runs_when_closing_the_generator_fails(no_gc):
    released = threading.Event()

    def failing():
        try:
            while True:
                yield CHUNK
        finally:
            raise RuntimeError("cleanup failed")

    response = ClosingStream(failing(), on_close=released.set)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        asyncio.run(stop_reading_and_hang_up(response))
    assert released.is_set()                    # the worker's place is given back all the same
