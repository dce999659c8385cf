"""The API server's non-streamed answers (openai_routes.Routes.generate_all): read from the
worker's stream, answered 503 when the worker cannot be reached, and given up (the worker's
stream closed) when the client hangs up first. Real sockets on loopback: a port nobody listens
on, and a worker that takes the request and never answers."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import suppress

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


def stream_from(parts, status: int | None = 200, seconds: float = 1.0,
                first: float = 2.0) -> list[dict]:
    """The chunks worker_stream makes of a worker that answers `status` (None: sends no
    headers at all), then sends each (delay in s, bytes) of `parts` as an HTTP chunk, then
    stays silent (an error ends its body); FastChat's worker timeout patched to `seconds`,
    START_SECONDS to `first`. Each chunk gets its arrival time."""
    from fastchat import constants
    from fastchat_cllm.serving import openai_routes

    async def answer(reader, writer):
        await reader.read(65536)                        # the request
        with suppress(asyncio.CancelledError):
            if status is not None:
                writer.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                for delay, data in parts:
                    await asyncio.sleep(delay)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                if status != 200:
                    writer.write(b"0\r\n\r\n")          # the error's body ends
            await asyncio.sleep(30)

    async def run():
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        out, began = [], time.monotonic()
        async for content in openai_routes.worker_stream({"prompt": "Hi"}, url):
            out.append(dict(content, at=time.monotonic() - began))
        server.close()
        return out

    saved = constants.WORKER_API_TIMEOUT, openai_routes.START_SECONDS
    constants.WORKER_API_TIMEOUT, openai_routes.START_SECONDS = seconds, first
    try:
        return asyncio.run(run())
    finally:
        constants.WORKER_API_TIMEOUT, openai_routes.START_SECONDS = saved


def chunk(text: str) -> bytes:
    return json.dumps({"text": text, "error_code": 0}).encode() + b"\0"


def test_keep_alives_do_not_start_the_answer_and_a_silent_worker_times_out():
    # queued: empty chunks every 0.25 s (more often than the 1 s per read) for 3 s
    queued = stream_from([(0.25, b"\0")] * 12)
    assert len(queued) == 1 and queued[0]["error_code"] == 50006
    assert "did not start its answer within 2.0 s" in queued[0]["text"]
    assert 1.9 < queued[0]["at"] < 4
    # started: two chunks (the second split across HTTP chunks), then silent
    talked = stream_from([(0.25, chunk("a")), (0.25, chunk("ab")[:5]), (0.25, chunk("ab")[5:])])
    assert [c["text"] for c in talked[:2]] == ["a", "ab"]
    assert talked[2]["error_code"] == 50006 and "sent nothing for 1.0 s" in talked[2]["text"]
    assert 1.6 < talked[2]["at"] < 3.5
    # not even headers: the request's send is bounded by START_SECONDS too
    mute = stream_from([], status=None)
    assert len(mute) == 1 and mute[0]["error_code"] == 50006
    assert mute[0]["text"].startswith("the worker did not start its answer within 2.0 s (http://")
    assert 1.9 < mute[0]["at"] < 4


def test_a_worker_reply_that_is_not_200_is_one_error_chunk():
    out = stream_from([(0, b"no such model")], status=400)
    assert len(out) == 1 and out[0]["error_code"] != 0
    assert out[0]["text"] == "the worker answered 400: no such model"


def test_a_chunk_that_is_not_fastchats_json_is_an_error_chunk():
    for bad in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"text": "no error code"}'):
        out = stream_from([(0, chunk("a")), (0, bad + b"\0")])
        assert out[0]["text"] == "a" and out[1]["error_code"] != 0, bad
        assert out[1]["text"].startswith("the worker sent a chunk that is not FastChat's"), bad
