"""responses.ClosingStream and the worker's queued_answer that it streams: a client that hangs
up closes the generator at once, which closes the worker's gate (a sync generator whose next()
runs in Starlette's thread pool) and gives back its place in the semaphore; the API server's
async generator is closed alike. A real uvicorn server on loopback, with the garbage collector
off while a test runs, so that nothing but the response can have closed the generator:
Starlette's own StreamingResponse leaves it to a collection, and a hung-up request decoded on
(tests/test_serving_batch.py). A client that stops reading before it hangs up (the response
waits in send() with the generator at a yield, a case a live server rarely reaches) is driven
through the ASGI calls themselves. The worker here is the two things queued_answer takes of
one (its gate, its semaphore): the engine behind a gate is tested with the real worker in
test_serving_batch and test_serving_reliability."""
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
from fastchat_cllm.serving.worker import queued_answer
from harness import free_ports, wait_for

CHUNK = b"x" * 16


class Body:
    """One request's generator: `chunks` chunks (None: endless), and what happened to it."""

    def __init__(self, chunks: int | None):
        self.chunks, self.sent = chunks, 0
        self.closed = threading.Event()

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


class Gated:
    """What queued_answer takes of a worker: a gate per request (here a Body's sync
    generator) and the semaphore of its places."""

    def __init__(self, body: Body, places: int = 1):
        self.body, self.semaphore = body, asyncio.Semaphore(places)

    def generate_stream_gate(self, params: dict):
        return self.body.sync()


@pytest.fixture(scope="module")
def server():
    app, bodies, workers = FastAPI(), {}, {}

    @app.get("/{kind}/{name}")
    async def stream(kind: str, name: str, chunks: int | None = None):
        body = bodies[name] = Body(chunks)
        if kind == "worker":
            workers[name] = Gated(body)
            return ClosingStream(queued_answer(workers[name], {}, 10.0))
        return ClosingStream(body.asynchronous())

    port = free_ports(1)[0]
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    wait_for(lambda: served.started, 30, "the test server listening")
    yield f"http://127.0.0.1:{port}", bodies, workers
    served.should_exit = True
    thread.join(30)


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def place_given_back(workers: dict, name: str) -> bool:
    return not workers[name].semaphore.locked()


@pytest.mark.parametrize("kind", ["worker", "async"])
def test_a_client_hanging_up_closes_the_generator_at_once(server, no_gc, kind):
    url, bodies, workers = server
    with requests.get(f"{url}/{kind}/hung-{kind}", stream=True, timeout=30) as reply:
        chunks = reply.iter_content(len(CHUNK))
        assert next(chunks) == CHUNK and next(chunks) == CHUNK
    body = bodies[f"hung-{kind}"]
    assert body.closed.wait(10), f"the generator runs on: {body.sent} chunks sent"
    if kind == "worker":
        wait_for(lambda: place_given_back(workers, "hung-worker"), 10, "the place given back")
    sent = body.sent
    time.sleep(0.1)
    assert body.sent == sent                     # and it stays stopped


@pytest.mark.parametrize("kind", ["worker", "async"])
def test_an_answer_read_to_its_end_is_whole_and_gives_its_place_back(server, no_gc, kind):
    url, bodies, workers = server
    reply = requests.get(f"{url}/{kind}/whole-{kind}", params={"chunks": 20}, timeout=30)
    assert reply.content == CHUNK * 20
    body = bodies[f"whole-{kind}"]
    assert body.closed.wait(10) and body.sent == 20
    if kind == "worker":
        wait_for(lambda: place_given_back(workers, "whole-worker"), 10, "the place given back")
        assert workers["whole-worker"].semaphore._value == 1      # given back once


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


@pytest.mark.parametrize("kind", ["worker", "async"])
def test_a_client_that_stops_reading_and_hangs_up_gets_the_generator_closed(no_gc, kind):
    body = Body(None)
    worker = Gated(body)

    async def respond():
        answer = queued_answer(worker, {}, 10.0) if kind == "worker" else body.asynchronous()
        await stop_reading_and_hang_up(ClosingStream(answer))
        return body.closed.is_set()     # now: asyncio.run's end closes what is left open

    assert asyncio.run(respond()), "the generator was left open"
    assert body.sent == 1
    if kind == "worker":
        assert not worker.semaphore.locked()


def test_the_place_is_given_back_when_closing_the_gate_fails(no_gc):
    def failing():
        try:
            while True:
                yield CHUNK
        finally:
            raise RuntimeError("cleanup failed")

    worker = Gated(Body(None))
    worker.generate_stream_gate = lambda params: failing()
    response = ClosingStream(queued_answer(worker, {}, 10.0))
    with pytest.raises(RuntimeError, match="cleanup failed"):
        asyncio.run(stop_reading_and_hang_up(response))
    assert not worker.semaphore.locked()         # the place is given back all the same


def test_a_queued_answer_keeps_its_reader_alive_and_its_place_in_line(no_gc):
    """Queued behind a held place, an answer sends an empty chunk every `every` s; the place
    goes to the first in line (even when a later one's keep-alives are rarer: an acquire
    cancelled and retried at every keep-alive would hand it to the later one); one that hangs up
    while queued takes no place."""
    async def scenario():
        worker = Gated(Body(None))
        await worker.semaphore.acquire()                # the one place, taken
        answered, alive = [], {"first": 0, "quitter": 0, "second": 0}

        async def read(name, answer):
            async for chunk in answer:
                if chunk != b"\0":
                    answered.append(name)
                    return
                alive[name] += 1

        first = queued_answer(worker, {}, 0.01)
        quitter = queued_answer(worker, {}, 0.01)
        second = queued_answer(worker, {}, 0.3)
        readers = {}
        for name, answer in (("first", first), ("quitter", quitter), ("second", second)):
            readers[name] = asyncio.ensure_future(read(name, answer))
            await asyncio.sleep(0.02)                   # in line: first, quitter, second
        readers["quitter"].cancel()                     # hangs up while queued
        await asyncio.gather(readers["quitter"], return_exceptions=True)
        await quitter.aclose()
        await asyncio.sleep(0.1)
        worker.semaphore.release()                      # the place comes free
        await asyncio.wait_for(readers["first"], 5)
        await asyncio.sleep(0.1)
        assert answered == ["first"], answered          # the second still waits
        await first.aclose()                            # done: the place passes on
        await asyncio.wait_for(readers["second"], 5)
        await second.aclose()
        return answered, alive, worker.semaphore._value

    answered, alive, free = asyncio.run(scenario())
    assert answered == ["first", "second"] and alive["first"] >= 5
    assert free == 1                                    # every place given back once, none taken
