"""The stack under faults, load and bad input (issue 7), on loopback: the launcher's Stack
(controller, Jacobi worker on SmolLM2 fp32, API server with --api-keys) started once for the
module with a 2 s heartbeat and a 10 s worker timeout, then bad requests, an injected CUDA
OOM, clients hanging up (streamed and not), 64 concurrent streams, a stream queued past the
worker timeout, a controller restart, a worker stopped mid-answer and a killed worker, in that order."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from unittest import mock

import pytest
import requests

from harness import (MODEL, auth, free_ports, listed_models, post_json, sse_chunks, start_stack,
                     wait_idle, wait_for, worker_status)

pytestmark = pytest.mark.slow
KEY = "sk-reliability"
OOM = "OOM-HOOK-7"                # FASTCHAT_CLLM_INJECT_OOM: prompts holding it fail as OOM
CONCURRENCY = 8                   # --limit-worker-concurrency: 64 streams queue 8 at a time
WORKER_API_TIMEOUT = 10           # the API server's wait for a worker's next chunk (FastChat's
#                                   100 s), which a request queued for a slot may wait past
HEARTBEAT = {"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "2",
             "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": "6", "FASTCHAT_CLLM_INJECT_OOM": OOM,
             "FASTCHAT_WORKER_API_TIMEOUT": str(WORKER_API_TIMEOUT)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    served = start_stack(tmp_path_factory.mktemp("logs"), "--dtype", "float32",
                         "--limit-worker-concurrency", str(CONCURRENCY), key=KEY, env=HEARTBEAT)
    yield served
    served.down()


def post(stack, path: str, body=None, key: str | None = KEY, **kwargs) -> requests.Response:
    return post_json(f"{stack.api}/{path}", body, key, **kwargs)


def chat_body(content: str = "Hi", max_tokens: int = 4, **kwargs) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **kwargs}


def listening_hosts(port: int) -> set[str]:
    """Local addresses of the IPv4 sockets listening on `port` (from /proc/net/tcp)."""
    hosts = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            hosts.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return hosts


def test_every_component_binds_loopback_by_default(stack):
    for url in (stack.controller, stack.worker, stack.api):
        port = int(url.split(":")[2].split("/")[0])
        assert listening_hosts(port) == {"127.0.0.1"}, url


def test_api_keys_through_the_launcher(stack):
    assert post(stack, "chat/completions", chat_body(), key=None).status_code == 401
    assert post(stack, "chat/completions", chat_body(), key="sk-wrong").status_code == 401
    assert requests.get(stack.api + "/models", timeout=10).status_code == 401
    assert requests.get(stack.api + "/models", headers=auth(KEY), timeout=10).ok


LONG = "word " * 9000             # SmolLM2's context is 8192 tokens
BAD = {   # kind: (endpoint, body, what the error message must name)
    "max_tokens negative": ("chat/completions", chat_body(max_tokens=-1), "max_tokens"),
    "max_tokens zero": ("chat/completions", chat_body(max_tokens=0), "max_tokens"),
    "max_tokens fractional": ("chat/completions", chat_body(max_tokens=1.5), "max_tokens"),
    "max_tokens a string": ("chat/completions", chat_body(max_tokens="ten"), "max_tokens"),
    "temperature negative": ("chat/completions", chat_body(temperature=-0.5), "temperature"),
    "temperature above 2": ("chat/completions", chat_body(temperature=50), "temperature"),
    "temperature a string": ("chat/completions", chat_body(temperature="hot"), "temperature"),
    "top_p above 1": ("chat/completions", chat_body(top_p=1.5), "top_p"),
    "top_p negative": ("chat/completions", chat_body(top_p=-0.1), "top_p"),
    "top_k zero": ("chat/completions", chat_body(top_k=0, temperature=0.7), "top_k"),
    "top_k negative": ("chat/completions", chat_body(top_k=-5, temperature=0.7), "top_k"),
    "n zero": ("chat/completions", chat_body(n=0), "n:"),
    "n absurd": ("chat/completions", chat_body(n=100000), "n:"),
    "prompt longer than the context": ("chat/completions", chat_body(LONG), "context length"),
    "empty messages": ("chat/completions", {**chat_body(), "messages": []}, "messages"),
    "unknown role": ("chat/completions",
                     {**chat_body(), "messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
    "content a number": ("chat/completions",
                         {**chat_body(), "messages": [{"role": "user", "content": 7}]},
                         "messages"),
    "unknown model": ("chat/completions", {**chat_body(), "model": "no-such-model"}, "model"),
    "model missing": ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                      "model"),
    "stop a number": ("chat/completions", chat_body(stop=5), "stop"),
    "100 stop strings": ("chat/completions", chat_body(stop=[f"s{i}" for i in range(100)]),
                         "stop"),
    "empty stop string": ("chat/completions", chat_body(stop=""), "stop"),
    "empty completion prompt": ("completions", {"model": MODEL, "prompt": "", "max_tokens": 4},
                                "prompt"),
    "logprobs 100": ("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4,
                                     "logprobs": 100}, "logprobs"),
    "top_logprobs 21": ("chat/completions", chat_body(logprobs=True, top_logprobs=21),
                        "top_logprobs"),
    "top_logprobs without logprobs": ("chat/completions", chat_body(top_logprobs=2),
                                      "top_logprobs"),
    "seed negative": ("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4,
                                      "seed": -1}, "seed"),
    "best_of 3": ("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4,
                                  "best_of": 3}, "best_of"),
    "presence_penalty": ("chat/completions", chat_body(presence_penalty=1.0),
                         "presence_penalty"),
    "an image part": ("chat/completions", {**chat_body(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "content[0]"),
    "a part without a type": ("chat/completions", {**chat_body(), "messages": [
        {"role": "user", "content": [{"text": "Hi"}]}]}, "content[0]"),
    "content null": ("chat/completions", {**chat_body(), "messages": [
        {"role": "user", "content": None}]}, "content"),
    "two different max tokens": ("chat/completions", chat_body(max_completion_tokens=9),
                                 "max_completion_tokens"),
    "logit_bias not a token id": ("chat/completions", chat_body(logit_bias={"x": 1}),
                                  "logit_bias"),
    "logit_bias 200": ("chat/completions", chat_body(logit_bias={"33": 200}), "logit_bias"),
    "logit_bias outside the vocabulary": ("chat/completions",
                                          chat_body(logit_bias={"10000000": 1}), "logit_bias"),
    "prompt ids outside the vocabulary": ("completions", {"model": MODEL, "prompt": [10 ** 7],
                                                          "max_tokens": 2}, "prompt"),
    "prompt ids and text mixed": ("completions", {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    "tools": ("chat/completions", chat_body(tools=[{"type": "function"}]), "tools"),
    "response_format json": ("chat/completions",
                             chat_body(response_format={"type": "json_object"}),
                             "response_format"),
    "suffix": ("completions", {"model": MODEL, "prompt": "Hi", "suffix": "x"}, "suffix"),
    "logit_bias key a non-ASCII digit": ("chat/completions", chat_body(logit_bias={"²": 1}),
                                         "logit_bias"),
    "logit_bias value true": ("chat/completions", chat_body(logit_bias={"33": True}),
                              "logit_bias"),
    "40 prompts x n 2": ("completions", {"model": MODEL, "prompt": ["Hi"] * 40, "n": 2,
                                         "max_tokens": 1}, "prompts"),
}
# Field values of the wrong shape, for every field a client may send (fuzz battery).
ODD = [None, True, -1, 0, 2.5, "", "x" * 300, [], {}, [None], [[1, [2]]], {"a": {"b": [1]}},
       "\x00", float("1e300")]
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "n", "max_tokens",
               "max_completion_tokens", "stop", "stream", "presence_penalty", "logprobs",
               "top_logprobs", "seed", "logit_bias", "stream_options", "tools", "tool_choice",
               "response_format", "user", "modalities"]
COMPLETION_FIELDS = ["model", "prompt", "suffix", "temperature", "n", "max_tokens", "stop",
                     "stream", "logprobs", "echo", "seed", "logit_bias", "best_of",
                     "use_beam_search", "stream_options"]
RAW = {   # kind: (body bytes, what the message must name)
    "malformed JSON": (b'{"model": "x", "messages": [', "JSON"),
    "invalid UTF-8": (b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user",'
                      b'"content":"\xff\xfe\xc3("}]}', "body"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_request_is_refused_naming_the_parameter(stack, kind):
    path, body, names = BAD[kind]
    reply = post(stack, path, body)
    error = reply.json()
    print(f"\n{kind}: {reply.status_code} {error}")
    assert reply.status_code == 400 and names in error["message"]
    assert "Traceback" not in error["message"] and ".py" not in error["message"]
    assert worker_status(stack.worker)["queue_length"] == 0


@pytest.mark.parametrize("kind", sorted(RAW))
def test_unparsable_body_is_refused(stack, kind):
    data, names = RAW[kind]
    reply = requests.post(stack.api + "/chat/completions", data=data, timeout=60, headers={
        **auth(KEY), "Content-Type": "application/json"})
    print(f"\n{kind}: {reply.status_code} {reply.text}")
    assert reply.status_code == 400 and names in reply.text


@pytest.mark.parametrize("content", ["\x00\x01\x02\x1b[2J\x7f",
                                     "<|im_start|><|im_end|><|endoftext|>" * 3])
def test_odd_but_valid_text_is_served(stack, content):
    """Control characters and a prompt of only special tokens are text: answered normally."""
    reply = post(stack, "chat/completions", chat_body(content))
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def fuzzed(path: str, base: dict, fields: list[str]):
    for field in fields:
        for value in ODD:
            if field in ("max_tokens", "max_completion_tokens", "n") and value in (None, 1e300):
                continue            # valid and unbounded: a long answer, not a fuzz case
            yield path, field, value, {**base, field: value}


def test_fuzzed_fields_get_200_or_a_4xx_with_a_code(stack):
    """Every field of both endpoints set to values of the wrong type, null, nested or huge: each
    answer is a 200 or a 4xx with an error code and a message (never a 500), streamed or not,
    and the worker's queue is back to 0 after."""
    chat = {**chat_body(max_tokens=2), "stream": False}
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    cases = [*fuzzed("chat/completions", chat, CHAT_FIELDS),
             *fuzzed("completions", completion, COMPLETION_FIELDS)]

    def send(case):
        path, field, value, body = case
        try:
            reply = post(stack, path, body, timeout=120)
        except ValueError:                      # not JSON-serialisable (inf): not sendable
            return None
        if reply.status_code == 200:
            return None
        error = reply.json() if reply.headers.get("content-type", "").startswith(
            "application/json") else {}
        ok = 400 <= reply.status_code < 500 and isinstance(error.get("code"), int) and \
            error.get("message")
        return None if ok else f"{path} {field}={value!r}: {reply.status_code} {reply.text[:200]}"

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(send, cases) if f]
    print(f"\n{len(cases)} fuzzed requests")
    assert not failures, "\n".join(failures)
    assert wait_idle(stack.worker)["queue_length"] == 0


def test_worker_serves_after_bad_requests(stack):
    reply = post(stack, "chat/completions", chat_body())
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert wait_idle(stack.worker)["queue_length"] == 0


def test_injected_cuda_oom_is_50002_and_the_next_request_succeeds(stack):
    reply = post(stack, "chat/completions", chat_body(f"{OOM} please"))
    assert reply.status_code == 400 and reply.json()["code"] == 50002
    assert "out of memory" in reply.json()["message"]
    assert post(stack, "chat/completions", chat_body()).status_code == 200
    assert wait_idle(stack.worker)["queue_length"] == 0


def test_client_hanging_up_frees_its_slot_and_stops_decoding(stack):
    before = worker_status(stack.worker)["jacobi"]
    body = chat_body("Write a long story about a dragon.", max_tokens=300, stream=True)
    with post(stack, "chat/completions", body, stream=True) as reply:
        contents = (c for c in sse_chunks(reply)
                    if c["choices"] and c["choices"][0]["delta"].get("content"))
        for _ in range(3):
            next(contents)
    idle = wait_idle(stack.worker, timeout=60)      # the hang-up reached the worker
    time.sleep(5)
    after = worker_status(stack.worker)
    print(f"\nforwards: before {before['forwards']}, at hang-up {idle['jacobi']['forwards']}, "
          f"5 s later {after['jacobi']['forwards']}")
    assert idle["queue_length"] == 0 and after["queue_length"] == 0
    assert after["jacobi"]["forwards"] == idle["jacobi"]["forwards"]     # decoding stopped
    assert after["jacobi"]["tokens"] - before["tokens"] < 100             # well short of 300
    assert after["jacobi"]["requests"] == before["requests"]              # never finished


def test_client_hanging_up_a_non_streamed_request_stops_its_decoding(stack):
    before = worker_status(stack.worker)["jacobi"]
    body = json.dumps(chat_body("Write a long story about a dragon.", max_tokens=300))
    host, port = stack.api.split("//")[1].split("/")[0].split(":")
    client = http.client.HTTPConnection(host, int(port), timeout=60)
    client.request("POST", "/v1/chat/completions", body,
                   {"Content-Type": "application/json", **auth(KEY)})
    wait_for(lambda: worker_status(stack.worker)["jacobi"]["tokens"] - before["tokens"] >= 10,
             60, "the answer decoding")
    client.close()                                  # hung up mid-answer, nothing read
    idle = wait_idle(stack.worker, timeout=60)      # the hang-up reached the worker
    time.sleep(3)
    after = worker_status(stack.worker)
    print(f"\nforwards: before {before['forwards']}, at hang-up {idle['jacobi']['forwards']}, "
          f"3 s later {after['jacobi']['forwards']}; tokens "
          f"{after['jacobi']['tokens'] - before['tokens']}")
    assert idle["queue_length"] == 0 and after["queue_length"] == 0
    assert after["jacobi"]["forwards"] == idle["jacobi"]["forwards"]     # decoding stopped
    assert after["jacobi"]["tokens"] - before["tokens"] < 200             # well short of 300
    assert after["jacobi"]["requests"] == before["requests"]              # never finished


QUESTIONS = ["What is the capital of France?", "Name three colors.", "Count to five.",
             "What is 2 + 2?"]


def stream_chat(stack, question: str, waits: list | None = None) -> tuple[str, str | None]:
    """The streamed answer and the error (None when none) of one greedy chat request; `waits`
    gets the seconds until its first words."""
    text, error, started = "", None, time.monotonic()
    with post(stack, "chat/completions", chat_body(question, max_tokens=12, stream=True),
              stream=True) as reply:
        if reply.status_code != 200:
            return text, reply.text
        for chunk in sse_chunks(reply):
            if {"error", "code", "error_code"} & set(chunk):
                error = str(chunk)
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
                if text and waits is not None and len(waits) == 0:
                    waits.append(time.monotonic() - started)
    return text, error


def test_64_concurrent_streams_equal_each_request_alone(stack):
    alone = {q: stream_chat(stack, q) for q in QUESTIONS}
    assert all(error is None and text for text, error in alone.values()), alone
    requests_64 = [QUESTIONS[i % len(QUESTIONS)] for i in range(64)]
    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda q: stream_chat(stack, q), requests_64))
    elapsed = time.monotonic() - started
    print(f"\n64 concurrent streams (12 tokens, limit {CONCURRENCY}): {elapsed:.1f} s")
    assert [error for _, error in results] == [None] * 64
    assert [text for text, _ in results] == [alone[q][0] for q in requests_64]
    assert wait_idle(stack.worker)["queue_length"] == 0


def test_a_stream_queued_past_the_worker_timeout_is_answered(stack):
    """Every slot busy with a long answer: the next stream waits in the worker's queue longer
    than FASTCHAT_WORKER_API_TIMEOUT (which bounds a next chunk, not a start), and is answered
    in full once a slot frees (its client hangs up)."""
    question = QUESTIONS[0]
    alone = stream_chat(stack, question)
    long_body = chat_body("Write a long story.", max_tokens=400, stream=True)
    busy = [post(stack, "chat/completions", long_body, stream=True) for _ in range(CONCURRENCY)]
    try:
        streams = [reply.iter_lines() for reply in busy]  # (kept: a dropped one hangs up)
        for lines in streams:
            until_words(lines)                            # each holds a slot
        waits: list[float] = []
        with ThreadPoolExecutor(2) as pool:
            queued = pool.submit(stream_chat, stack, question, waits)
            web_ui = pool.submit(web_ui_answer, stack.worker, "The capital of France is")
            time.sleep(WORKER_API_TIMEOUT + 3)
            assert not queued.done() and not waits        # still queued, past the timeout
            assert not web_ui.done()
            busy[0].close()                               # a slot frees
            answer = queued.result(timeout=120)
            busy[1].close()
            web_ui_chunks = web_ui.result(timeout=120)
    finally:
        for reply in busy:
            reply.close()
    print(f"\nqueued {waits[0]:.1f} s, then: {answer}; the web UI's: {web_ui_chunks[-1]}")
    assert answer == alone and waits[0] > WORKER_API_TIMEOUT
    assert web_ui_chunks[-1]["error_code"] == 0 and web_ui_chunks[-1]["text"]
    assert wait_idle(stack.worker)["queue_length"] == 0


def web_ui_answer(worker: str, prompt: str) -> list[dict]:
    """The chunks FastChat's web UI reads from the worker for `prompt`, with its read timeout
    set to the stack's worker timeout (the worker sends empty chunks while it is queued)."""
    from fastchat.serve import gradio_web_server

    conv = SimpleNamespace(stop_str=None, stop_token_ids=None)
    with mock.patch.object(gradio_web_server, "WORKER_API_TIMEOUT", WORKER_API_TIMEOUT):
        return list(gradio_web_server.model_worker_stream_iter(
            conv, MODEL, worker, prompt, 0.0, 1.0, 1.0, 12, []))


def test_controller_restart_worker_registers_again(stack):
    controller = next(c for c in stack.children if c.name == "controller")
    controller.process.send_signal(signal.SIGTERM)
    controller.process.wait(30)
    stack.children.remove(controller)
    with mock.patch.dict(os.environ, HEARTBEAT):
        stack.start("controller", "fastchat.serve.controller", "--port",
                    stack.controller.rsplit(":", 1)[1])
    wait_for(lambda: listed_models(stack.controller) == [MODEL], 60, "the worker registers again",
             check=stack.check_alive)
    assert post(stack, "chat/completions", chat_body()).status_code == 200


def until_words(lines) -> None:
    """Read a streamed chat reply's lines up to its first chunk of answer text (the worker's
    answer has started)."""
    for line in lines:
        if line.startswith(b"data: {") and any(choice["delta"].get("content") for choice
                                               in json.loads(line[6:]).get("choices", [])):
            return
    raise AssertionError("the stream ended before any answer text")


def test_a_worker_silent_mid_answer_ends_the_stream_with_an_error(stack):
    """A worker that stops sending (SIGSTOP) for longer than FASTCHAT_WORKER_API_TIMEOUT: the
    stream ends with a 50006 chunk and [DONE]; resumed, the worker serves again."""
    worker = next(c for c in stack.children if c.name == "worker")
    try:
        with post(stack, "chat/completions", chat_body("Write a long story.", max_tokens=400,
                                                       stream=True), stream=True) as streamed:
            lines = streamed.iter_lines()
            until_words(lines)
            worker.process.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            rest = [line for line in lines if line.startswith(b"data:")]
            silent = time.monotonic() - stopped
    finally:
        worker.process.send_signal(signal.SIGCONT)
    print(f"\nworker stopped mid-answer: the stream ended after {silent:.1f} s: {rest[-2:]}")
    assert rest[-1] == b"data: [DONE]" and b'"error_code": 50006' in rest[-2], rest[-3:]
    assert silent > WORKER_API_TIMEOUT - 1       # (its last chunk may have come just before)
    wait_for(lambda: post(stack, "chat/completions", chat_body()).status_code == 200, 60,
             "the worker serves again", check=stack.check_alive)


def test_killed_worker_gets_a_clear_error_not_a_hang(stack):
    worker = next(c for c in stack.children if c.name == "worker")
    with post(stack, "chat/completions", chat_body("Write a long story.", max_tokens=400,
                                                   stream=True), stream=True) as streamed:
        lines = streamed.iter_lines()
        until_words(lines)            # killed mid-answer: an error chunk, then [DONE]
        worker.process.kill()
        worker.process.wait(30)
        rest = [line for line in lines if line.startswith(b"data:")]
    print(f"\nkilled mid-answer, the stream ended: {rest[-2:]}")
    assert rest[-1] == b"data: [DONE]" and b'"error_code": 50005' in rest[-2], rest[-3:]
    started = time.monotonic()
    reply = post(stack, "chat/completions", chat_body())     # the controller still lists it
    print(f"\nworker killed: {reply.status_code} {reply.text}")
    assert (reply.status_code, reply.json()["code"]) == (503, 50005)
    assert "worker" in reply.json()["message"] and time.monotonic() - started < 30
    with post(stack, "chat/completions", chat_body(stream=True), stream=True) as streamed:
        assert streamed.status_code == 503 or b"data:" not in b"".join(streamed.iter_content())
    deadline, codes = time.monotonic() + 60, set()
    while 40301 not in codes and time.monotonic() < deadline:   # until the controller drops it
        time.sleep(2)
        reply = post(stack, "chat/completions", chat_body())
        codes.add(reply.json()["code"])
    print(f"after expiry: {reply.status_code} {reply.text}")
    assert codes <= {50005, 40301} and (reply.status_code, reply.json()["code"]) == (400, 40301)


def not_a_model(folder) -> str:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    return str(folder)


@pytest.mark.parametrize("flags, reason", [
    (["--model-path", "/no/such/model"], "'/no/such/model' does not exist"),
    (["--model-path", "{tmp}"], "is not a model folder"),
    (["--model-path", "{bad}"], "cannot load --model-path"),
    (["--model-path", "{bad}/config.json"], "is not a model: give a .gguf file or a model folder"),
])
def test_worker_refuses_to_start_with_one_line(tmp_path, flags, reason):
    (tmp_path / "empty").mkdir()
    flags = [f.format(tmp=tmp_path / "empty", bad=not_a_model(tmp_path)) for f in flags]
    done = subprocess.run([sys.executable, "-m", "fastchat_cllm.worker", "--no-register",
                           "--port", str(free_ports(1)[0]), *flags], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    print(f"\n{flags}: exit {done.returncode}: {errors}")
    assert done.returncode != 0 and reason in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 6
