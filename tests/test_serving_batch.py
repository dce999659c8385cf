"""The worker's one shared engine behind the stock controller and our API server (issue 13): a
tiny random Llama (fp32, char tokenizer, 4096-position context) served with 8 slots of 1024
positions, on loopback. 64 concurrent streams each equal their answer alone; a request its slot
cannot hold is refused (40303) before it joins; an injected fault in one request's verification
fails that request only; 10 clients hanging up free their slots; 300 requests leave the
worker's memory where 20 left it."""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness import (post_json, save_tiny_model, sse_chunks, start_stack, wait_for, wait_idle,
                     worker_status)

MODEL = "tiny-llama"
SLOTS, MAX_LEN = 8, 1024
FAULT = "FAULT-HOOK-13"           # FASTCHAT_CLLM_INJECT_FAULT: prompts holding it fail inside
PROMPTS = ["Hi", "What is the capital of France?", "Count: 1 2 3", "x",
           "A longer prompt that takes a few more positions of its slot to prefill, " * 3,
           "def f(x):\n    return", "Q: 2+2? A:", "Lorem ipsum dolor sit amet"]
NEW_TOKENS = 24
# The compiled step's oneDNN kernels are cached per shape (the number of tokens of a step), in
# caches of 1024 entries each by default: a worker's memory grows until they are full (~180 MB
# for this model, ~3% of SmolLM2's worker over its first 250 requests). Capped here, so that
# they are full within the first 20 requests and the memory test sees what is left: leaks.
SMALL_SHAPE_CACHES = {"LRU_CACHE_CAPACITY": "16", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("models") / MODEL,
                             max_position_embeddings=4096)
    served = start_stack(tmp_path_factory.mktemp("logs"), "--model-path", str(folder),
                         "--limit-worker-concurrency", str(SLOTS), "--max-len", str(MAX_LEN),
                         env={"FASTCHAT_CLLM_INJECT_FAULT": FAULT, **SMALL_SHAPE_CACHES},
                         model=MODEL)
    yield served
    served.down()


def stream(stack, prompt: str, max_tokens: int = NEW_TOKENS) -> tuple[str, str | None]:
    """The streamed completion (greedy) and its finish reason, or the error's text."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    text, reason = "", None
    with post_json(stack.api + "/completions", body, stream=True, timeout=300) as reply:
        if reply.status_code != 200:
            return text, reply.text
        for chunk in sse_chunks(reply):
            if "error_code" in chunk or "code" in chunk:
                return text, str(chunk)
            for choice in chunk["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


def batch(stack) -> dict:
    return worker_status(stack.worker)["batch"]


@pytest.fixture(scope="module")
def alone(stack) -> dict[str, tuple[str, str]]:
    """Each prompt's streamed answer with no other request in the worker."""
    return {prompt: stream(stack, prompt) for prompt in PROMPTS}


def test_status_reports_the_batch(stack):
    status = worker_status(stack.worker)
    assert {"model_names", "speed", "queue_length", "jacobi"} <= set(status)
    assert status["batch"]["slots"] == SLOTS and status["batch"]["max_len"] == MAX_LEN
    assert status["batch"]["active_slots"] == 0 and status["batch"]["cache_mib"] > 0
    assert status["batch"]["compiled"] is True           # --compile auto: on the CPU
    worker = next(child for child in stack.children if child.name == "worker")
    assert "slot cache: 8 slots x 1024 positions" in worker.tail(200)
    assert re.search(r"engine step: compiled in \d+ s", worker.tail(200))


def test_the_next_turn_prefills_only_what_is_new(stack):
    """Prefix caching (the worker's default): a prompt that extends an earlier request's prompt
    and answer starts from what that request's slot still holds."""
    worker = next(child for child in stack.children if child.name == "worker")
    assert "prefix caching on" in worker.tail(200)
    first = "The quick brown fox jumps over the lazy dog, " * 3
    answer, _ = stream(stack, first)
    before = batch(stack)
    follow_up = first + answer + " And then?"
    text, reason = stream(stack, follow_up)
    after = batch(stack)
    assert reason in ("length", "stop") and text
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    assert prompt >= len(follow_up) > cached >= len(first)      # char tokenizer: >= 1 per char


def test_64_concurrent_streams_equal_each_alone(stack, alone):
    assert all(reason in ("length", "stop") for _, reason in alone.values()), alone
    before, busiest, done = batch(stack), [], threading.Event()

    def watch():
        while not done.is_set():
            busiest.append(batch(stack)["active_slots"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda p: stream(stack, p), prompts))
    done.set()
    watcher.join()
    assert results == [alone[p] for p in prompts]
    idle, after = wait_idle(stack.worker), batch(stack)
    print(f"\nactive slots at most {max(busiest)}; batch {after}")
    assert idle["queue_length"] == 0 and after["active_slots"] == after["waiting"] == 0
    assert after["finished"] - before["finished"] == 64 and 1 < max(busiest) <= SLOTS
    assert after["tokens_per_forward"] >= 1
    assert after["compiled"] and after["eager_steps"] == 0     # the compiled step served all


def worker_chunks(stack, params: dict) -> list[dict]:
    """The worker's own chunks for `params` (/worker_generate_stream, no API server)."""
    with requests.post(stack.worker + "/worker_generate_stream", json=params, stream=True,
                       timeout=300) as reply:
        return [json.loads(c) for c in reply.iter_lines(delimiter=b"\0") if c]


def test_a_request_its_slot_cannot_hold_is_refused_before_it_joins(stack):
    before = batch(stack)
    chunks = worker_chunks(stack, {"prompt": "x" * 1000, "max_new_tokens": 100,
                                   "temperature": 0})
    assert len(chunks) == 1 and chunks[0]["error_code"] == 40303
    assert "1000 tokens" in chunks[0]["text"] and "--max-len" in chunks[0]["text"]
    reply = post_json(stack.api + "/completions", {"model": MODEL, "prompt": "x" * 1100})
    assert reply.status_code == 400 and reply.json()["code"] == 40303
    assert f"maximum context length is {MAX_LEN} tokens" in reply.json()["message"]
    after = batch(stack)
    assert (after["requests"], after["refused"]) == (before["requests"], before["refused"])


def test_an_injected_fault_fails_only_its_request(stack):
    """Seven long streams decode; an eighth request fails at its first verification (the test
    hook): it gets an error with code 50001, the seven their answers alone, and the worker
    serves on."""
    prompts = [f"Hi {i}" for i in range(7)]              # greedy runs 300 tokens, no EOS
    alone = [stream(stack, prompt, 300) for prompt in prompts]
    before, started = batch(stack), threading.Barrier(len(prompts) + 1)

    def run(prompt: str) -> tuple[str, str | None]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 300, "temperature": 0,
                "stream": True}
        text, reason = "", None
        with post_json(stack.api + "/completions", body, stream=True, timeout=300) as reply:
            for i, chunk in enumerate(sse_chunks(reply)):
                if i == 0:
                    started.wait(60)
                text += "".join(choice["text"] for choice in chunk["choices"])
                reason = chunk["choices"][0]["finish_reason"] or reason
        return text, reason

    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = pool.map(run, prompts)
        started.wait(60)                                   # all seven are decoding
        reply = post_json(stack.api + "/completions", {"model": MODEL, "temperature": 0,
                                                       "prompt": f"{FAULT} Hi", "max_tokens": 8})
        during = batch(stack)
        results = list(streams)
    print(f"\nfault: {reply.status_code} {reply.text}\nbatch then: {during}")
    assert reply.status_code == 400 and reply.json()["code"] == 50001
    assert "outside the vocabulary" in reply.json()["message"]
    # (whether the seven were still decoding when it failed is timing: the engine decodes ahead
    # of the readers, so it is not asserted; their answers equal their solo ones either way)
    assert during["failed"] == before["failed"] + 1
    assert results == alone and all(reason == "length" for _, reason in alone)
    assert stream(stack, PROMPTS[0]) == stream(stack, PROMPTS[0])


def test_ten_clients_hanging_up_free_their_slots(stack, alone):
    before = batch(stack)

    def hang_up(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Hi {i}", "max_tokens": 900, "temperature": 0,
                "stream": True}                     # greedy runs 900 tokens, no EOS
        with post_json(stack.api + "/completions", body, stream=True, timeout=300) as reply:
            chunks = sse_chunks(reply)
            next(chunks), next(chunks)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(hang_up, range(10)))

    def settled():        # the last two may join only as the first eight leave
        now = batch(stack)
        ended = sum(now[k] - before[k] for k in ("cancelled", "finished", "failed"))
        return now if ended >= 10 and now["active_slots"] == 0 else None

    after = wait_for(settled, 60, "ten requests ended, no slot in use")
    print(f"\nafter 10 hang-ups: {after}")
    assert after["cancelled"] - before["cancelled"] == 10, \
        f"a request whose client hung up ran on: {after}"
    assert after["finished"] == before["finished"] and after["waiting"] == 0
    assert wait_idle(stack.worker)["queue_length"] == 0
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda p: stream(stack, p), PROMPTS)) == [alone[p] for p in PROMPTS]


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def test_worker_memory_after_300_requests_is_within_5_percent_of_after_20(stack):
    worker = next(child for child in stack.children if child.name == "worker").process.pid
    params = [{"prompt": PROMPTS[i % len(PROMPTS)] + str(i), "max_new_tokens": 8,
               "temperature": 0, "echo": False} for i in range(300)]
    with ThreadPoolExecutor(SLOTS) as pool:
        first = list(pool.map(lambda p: worker_chunks(stack, p)[-1], params[:20]))
        early = rss_kib(worker)
        rest = list(pool.map(lambda p: worker_chunks(stack, p)[-1], params[20:]))
    late = rss_kib(worker)
    print(f"\nworker RSS after 20 requests {early} KiB, after 300 {late} KiB")
    assert all(chunk["error_code"] == 0 for chunk in first + rest)
    assert late <= early * 1.05
    assert wait_idle(stack.worker)["queue_length"] == 0 and batch(stack)["active_slots"] == 0
