"""The worker's shared engine in-process: EngineLoop (one engine on its own thread) under the
worker's generate_stream, with requests from many threads (tiny fp64 models, char tokenizer).

Streams that join and leave at different times each get their solo greedy text; a closed
stream cancels its request and frees its slot; a seeded sample does not depend on its
neighbours; a request the engine refuses or fails raises in its own thread only.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from harness import char_tokenizer, tiny_greedy
from fastchat_cllm import JacobiConfig
from fastchat_cllm.core.engine import Engine, EngineLoop
from fastchat_cllm.serving.stream import generate_stream

F64 = torch.float64
EOS = 2                                  # the char tokenizer's </s>, a stop token of every request
# (prompt, max_new_tokens): different lengths, so requests join and leave at different forwards
REQUESTS = (("Hello there", 40), ("a", 25), ("The quick brown fox jumps over the lazy dog " * 2,
                                              33),
            ("xyz 123", 50), ("Q?", 12), ("Once upon a time, in a land far away", 45))


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_f64):
    return tiny_f64


@pytest.fixture
def loop(model):
    """An engine loop over `model` with 3 slots (6 requests queue), closed after the test."""
    started = EngineLoop(Engine(model, slots=3, max_len=256, chunk=8))
    yield started
    started.close()


def stream(model, tokenizer, loop, prompt: str, max_new_tokens: int, **params) -> list[dict]:
    params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0,
              "echo": False, **params}
    return list(generate_stream(model, tokenizer, params, context_len=512, engine=loop))


def solo_text(arch, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """transformers' greedy answer (stopping at EOS) as the worker shows it; its token count."""
    tokens = tiny_greedy(arch, tokenizer(prompt).input_ids, max_new_tokens, eos=(EOS,), dtype=F64)
    shown = tokens[:-1] if tokens[-1:] == [EOS] else tokens
    return tokenizer.decode(shown, skip_special_tokens=True, spaces_between_special_tokens=False,
                            clean_up_tokenization_spaces=False), len(tokens)


def test_concurrent_streams_equal_their_solo_greedy(arch, model, tokenizer, loop):
    """Six threads, three slots: request i starts once request i - 1 has its first chunk, so
    they join while others decode, queue for slots and finish at different forwards."""
    answers, first = {}, [threading.Event() for _ in REQUESTS]

    def run(i: int, prompt: str, max_new: int) -> None:
        if i:
            first[i - 1].wait(60)
        params = {"prompt": prompt, "max_new_tokens": max_new, "temperature": 0, "echo": False}
        chunks = []
        for chunk in generate_stream(model, tokenizer, params, context_len=512, engine=loop):
            chunks.append(chunk)
            first[i].set()
        first[i].set()
        answers[i] = chunks[-1]

    threads = [threading.Thread(target=run, args=(i, *r)) for i, r in enumerate(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for i, (prompt, max_new) in enumerate(REQUESTS):
        text, count = solo_text(arch, tokenizer, prompt, max_new)
        assert (answers[i]["text"], answers[i]["usage"]["completion_tokens"]) == (text, count)
    status = loop.status()
    assert (status["requests"], status["finished"], status["active_slots"]) == (6, 6, 0)
    own = [answer["usage"]["jacobi_forwards"] for answer in answers.values()]
    assert status["forwards"] < sum(own)                 # requests shared forwards
    assert status["tokens"] == sum(a["usage"]["jacobi_tokens"] for a in answers.values())


def wait_status(loop: EngineLoop, ready, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not ready(status := loop.status()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return status


def test_closing_a_stream_cancels_its_request_and_frees_its_slot(arch, model, tokenizer, loop):
    params = {"prompt": "Tell me everything.", "max_new_tokens": 230, "temperature": 0,
              "echo": False}
    chunks = generate_stream(model, tokenizer, params, context_len=512, stream_interval=1,
                             engine=loop)
    next(chunks), next(chunks)
    chunks.close()                                   # the client hung up
    status = wait_status(loop, lambda s: s["active_slots"] == 0)
    assert (status["cancelled"], status["finished"], status["active_slots"]) == (1, 0, 0)
    prompt, max_new = REQUESTS[0]
    assert stream(model, tokenizer, loop, prompt, max_new)[-1]["text"] == \
        solo_text(arch, tokenizer, prompt, max_new)[0]


def test_a_seeded_sample_is_the_same_with_or_without_neighbours(model, tokenizer, loop):
    sampled = dict(temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=7)
    alone = stream(model, tokenizer, loop, "Roll the dice:", 30, **sampled)[-1]["text"]
    texts = {}

    def run(name: str, prompt: str, **params) -> None:
        texts[name] = stream(model, tokenizer, loop, prompt, 30, **params)[-1]["text"]

    threads = [threading.Thread(target=run, args=args, kwargs=kwargs) for args, kwargs in (
        (("greedy", "A long neighbouring prompt to prefill " * 3), {}),
        (("other seed", "Roll the dice:"), {**sampled, "seed": 8}),
        (("seeded", "Roll the dice:"), sampled))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert texts["seeded"] == alone and texts["other seed"] != alone


def test_a_refused_or_failed_request_raises_in_its_own_thread(model, tokenizer, loop):
    """The engine refuses a prompt longer than a slot and fails a request whose verification
    raises; the caller gets the error, the loop serves on."""
    with pytest.raises(ValueError, match="max_len"):
        list(loop.submit(list(range(3, 90)) * 3, JacobiConfig(max_new_tokens=20)))
    bad = JacobiConfig(max_new_tokens=20, logit_bias=((96, 1.0),))      # past the vocabulary
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(loop.submit([5, 6, 7], bad))
    assert len(stream(model, tokenizer, loop, "still here", 5)) >= 1
    status = loop.status()
    assert (status["refused"], status["failed"], status["finished"]) == (1, 1, 1)


def test_a_bug_in_the_loop_fails_its_requests_and_the_loop_serves_on(arch, model, tokenizer,
                                                                    loop, monkeypatch):
    """An exception outside any request and any forward (here: the loop's status snapshot)
    fails the live requests instead of killing the thread and leaving callers waiting forever;
    the next request is served exactly. After close(), submitting raises."""
    real, calls = loop.describe, []

    def describe_once_broken():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug in the loop")
        return real()

    monkeypatch.setattr(loop, "describe", describe_once_broken)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        stream(model, tokenizer, loop, "Count to a hundred.", 200)
    monkeypatch.setattr(loop, "describe", real)
    prompt, max_new = REQUESTS[0]
    assert stream(model, tokenizer, loop, prompt, max_new)[-1]["text"] == \
        solo_text(arch, tokenizer, prompt, max_new)[0]
    loop.close()
    with pytest.raises(RuntimeError, match="stopped"):
        next(loop.submit([1, 2, 3], JacobiConfig(max_new_tokens=4)))


def test_an_engine_built_by_the_loop_is_built_on_its_thread(model, tokenizer, arch):
    """EngineLoop(build) runs build() on the loop's own thread (the worker loads its model
    there, so no other thread leaves an OpenMP team that slows every forward), returns when it
    has, and serves as usual."""
    threads = []

    def build() -> Engine:
        threads.append(threading.current_thread())
        return Engine(model, slots=2, max_len=256, chunk=8)

    loop = EngineLoop(build)
    try:
        assert threads == [loop.thread] and threads[0] is not threading.current_thread()
        prompt, budget = REQUESTS[0]
        assert stream(model, tokenizer, loop, prompt, budget)[-1]["text"] == \
            solo_text(arch, tokenizer, prompt, budget)[0]
    finally:
        loop.close()


def test_a_build_that_fails_raises_in_the_caller():
    """What the build raises, the constructor raises (the worker turns it into its start-up
    error); the loop's thread has ended."""
    def build() -> Engine:
        raise ValueError("no such model")

    def loops() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "engine-loop"]

    before = loops()
    with pytest.raises(ValueError, match="no such model"):
        EngineLoop(build)
    assert loops() == before
