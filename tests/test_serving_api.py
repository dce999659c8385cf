"""The OpenAI API as today's clients send it (issue 16), through the openai SDK against the
launcher's stack (SmolLM2 fp32): content parts, role developer, max_completion_tokens,
logit_bias, token-id prompts, options refused by name, big bodies refused fast. Greedy answers
are checked against transformers' generate on the prompt the API builds."""
from __future__ import annotations

import time

import pytest

from harness import MODEL, ar_greedy, post_json, start_stack, wait_idle

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    served = start_stack(tmp_path_factory.mktemp("logs"), "--dtype", "float32")
    yield served
    served.down()


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.api, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat_prompt(stack, smollm2):
    """The token ids the API server makes of [system?, user QUESTION] (the worker's template)."""
    from fastchat_cllm.serving.web_ui import worker_conversation

    def build(system: str | None = None) -> list[int]:
        conv = worker_conversation(stack.controller, MODEL)
        if system is not None:
            conv.set_system_message(system)
        conv.append_message(conv.roles[0], QUESTION)
        conv.append_message(conv.roles[1], None)
        return smollm2[1](conv.get_prompt()).input_ids
    return build


def reference(smollm2, ids: list[int], new: int, bias: dict[int, float] | None = None) -> str:
    """transformers' greedy generate (with OpenAI's logit_bias as single-token sequence_bias)."""
    model, tokenizer = smollm2
    return tokenizer.decode(ar_greedy(model, ids, new, [tokenizer.eos_token_id], bias),
                            skip_special_tokens=True)


def chat(client, stream: bool = False, **kwargs) -> tuple[str, dict | None]:
    """(answer text, usage) of a greedy chat completion, streamed or not."""
    body = dict(model=MODEL, temperature=0, max_tokens=32,
                messages=[{"role": "user", "content": QUESTION}])
    body.update(kwargs)
    if not stream:
        reply = client.chat.completions.create(**body)
        return reply.choices[0].message.content, reply.usage.model_dump()
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.model_dump()


@pytest.mark.parametrize("stream", [False, True])
def test_content_parts_are_joined_text(client, smollm2, chat_prompt, stream):
    parts = [{"type": "text", "text": "What is the capital of France?"},
             {"type": "text", "text": "Answer in one sentence."}]
    joined = [{"role": "user", "content": "What is the capital of France?\nAnswer in one "
                                          "sentence."}]
    text, _ = chat(client, stream, messages=[{"role": "user", "content": parts}])
    assert text == chat(client, False, messages=joined)[0]
    one = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    assert chat(client, stream, messages=one)[0] == reference(smollm2, chat_prompt(), 32)


def test_an_image_part_is_refused_naming_it(client):
    from openai import BadRequestError

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(BadRequestError, match=r"messages\[0\]\.content\[1\].*image_url"):
        chat(client, messages=[{"role": "user",
                                "content": [{"type": "text", "text": "Hi"}, image]}])


@pytest.mark.parametrize("stream", [False, True])
def test_developer_is_a_system_message(client, smollm2, chat_prompt, stream):
    system = "You answer in French."
    text, _ = chat(client, stream, messages=[{"role": "developer", "content": system},
                                             {"role": "user", "content": QUESTION}])
    assert text == reference(smollm2, chat_prompt(system), 32)
    assert text == chat(client, stream, messages=[{"role": "system", "content": system},
                                                  {"role": "user", "content": QUESTION}])[0]


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_is_max_tokens(client, stream):
    text, usage = chat(client, stream, max_tokens=None, max_completion_tokens=5,
                       messages=[{"role": "user", "content": "Count from 1 to 100."}])
    assert usage["completion_tokens"] == 5, (text, usage)


def test_max_completion_tokens_alone_on_completions(client):
    """Completions' max_tokens defaults to 16: the SDK's other name alone still decides."""
    reply = client.completions.create(model=MODEL, prompt="Count from 1 to 100:", temperature=0,
                                      extra_body={"max_completion_tokens": 20})
    assert reply.usage.completion_tokens == 20


def test_max_tokens_and_a_different_max_completion_tokens_are_refused(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="max_completion_tokens"):
        chat(client, max_tokens=6, max_completion_tokens=5)
    assert chat(client, max_tokens=5, max_completion_tokens=5)[1]["completion_tokens"] <= 5


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_steers_greedy_decoding_exactly(client, smollm2, chat_prompt, stream):
    tokenizer = smollm2[1]
    paris = tokenizer(" Paris").input_ids[0]
    plain = chat(client, stream)[0]
    assert "Paris" in plain
    bias = {paris: -100.0, tokenizer(" Lyon").input_ids[0]: 8.0}
    text, _ = chat(client, stream, logit_bias={str(t): b for t, b in bias.items()})
    assert text != plain and " Paris" not in text
    assert text == reference(smollm2, chat_prompt(), 32, bias)


def test_logit_bias_holds_when_sampling(client, smollm2):
    one = smollm2[1](" banana").input_ids[0]
    reply = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=2,
                                      max_tokens=4, temperature=1.0, seed=3,
                                      logit_bias={str(one): 100})
    for choice in reply.choices:
        assert choice.text == " banana" * 4


@pytest.mark.parametrize("stream", [False, True])
def test_token_id_prompts_are_fed_as_they_are(client, smollm2, stream):
    tokenizer = smollm2[1]
    first = tokenizer("The capital of France is").input_ids
    second = tokenizer("def fibonacci(n):").input_ids
    body = dict(model=MODEL, max_tokens=8, temperature=0)
    expected = [reference(smollm2, ids, 8) for ids in (first, first, second, second)]
    if stream:
        texts = ["", "", "", ""]
        for chunk in client.completions.create(prompt=[first, second], n=2, stream=True, **body):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        reply = client.completions.create(prompt=[first, second], n=2, **body)
        texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
        assert reply.usage.prompt_tokens == 2 * (len(first) + len(second))
    assert texts == expected
    alone = client.completions.create(prompt=first, **body)
    assert alone.choices[0].text == expected[0] and alone.usage.prompt_tokens == len(first)


def test_a_token_id_prompt_over_the_context_is_refused(stack):
    reply = post_json(stack.api + "/completions", {"model": MODEL, "prompt": [504] * 9000,
                                                   "max_tokens": 4})
    assert reply.status_code == 400 and reply.json()["code"] == 40303, reply.text


@pytest.mark.parametrize("path, extra, name", [
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
    ("chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("completions", {"suffix": "return x"}, "suffix"),
])
def test_options_that_cannot_be_honoured_are_refused_by_name(stack, path, extra, name):
    body = ({"model": MODEL, "prompt": "def f(x):", "max_tokens": 2} if path == "completions"
            else {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 2})
    for stream in (False, True):
        reply = post_json(f"{stack.api}/{path}", {**body, **extra, "stream": stream})
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == 40302 and f"'{name}'" in reply.json()["message"]


def test_what_changes_nothing_is_served(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "response_format": {"type": "text"}, "tool_choice": "none", "modalities": ["text"],
            "user": "u1"}
    reply = post_json(stack.api + "/chat/completions", body)
    assert reply.status_code == 200, reply.text


def test_a_20_mb_body_is_refused_in_under_a_second(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a " * 10_000_000}]}
    started = time.monotonic()
    reply = post_json(stack.api + "/chat/completions", body)
    assert time.monotonic() - started < 1.0
    assert reply.status_code == 413 and "--max-request-bytes" in reply.json()["message"]
    assert wait_idle(stack.worker)["queue_length"] == 0


@pytest.mark.parametrize("words", [9_000, 700_000])
def test_a_prompt_over_the_context_is_refused_fast(stack, words):
    """Just over the context, and 3.5 MB (under the body limit): only as much is tokenized as
    proves it too long."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * words}]}
    started = time.monotonic()
    reply = post_json(stack.api + "/chat/completions", body)
    assert time.monotonic() - started < 3.0
    assert reply.status_code == 400 and reply.json()["code"] == 40303, reply.text


def test_streams_and_choices_still_agree(client):
    """n > 1 streamed chat with content parts: every choice equals the non-streamed one."""
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=16,
                                           temperature=0)
    texts = ["", ""]
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2,
                                                max_tokens=16, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]
