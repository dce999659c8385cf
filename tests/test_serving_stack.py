"""End to end on loopback: `python -m fastchat_cllm.serve --web` (the stock controller, our
worker on SmolLM2 in fp32, our API server, our web UI) driven through the openai SDK and a
headless Chromium; the terminal chat; answers compared with transformers' greedy generate."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from harness import MODEL, START_TIMEOUT, Serve, ar_greedy, worker_status

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."
SCREENSHOT = "/tmp/fastchat_cllm_webui.png"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    served = Serve(tmp_path_factory.mktemp("serve"), "--dtype", "float32", web=True)
    yield served
    served.close()


@pytest.fixture(scope="module")
def terminal_chat(launched, tmp_path_factory):
    """FastChat's terminal chat with the Jacobi step, one question on stdin (started early)."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "stdin.txt").write_text(QUESTION + "\n")
    with open(folder / "stdin.txt") as stdin:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastchat_cllm.cli", "--style", "simple",
             "--max-new-tokens", "48"], cwd=folder, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
    yield process
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def stack(launched, terminal_chat, smollm2):
    launched.wait_ready()
    return launched


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.api, api_key="unused")


@pytest.fixture(scope="module")
def greedy_chat(stack, smollm2):
    """The answer to QUESTION by transformers' greedy generate, on the prompt the API builds
    (the worker's conversation template)."""
    from fastchat_cllm.serving.web_ui import worker_conversation

    model, tokenizer = smollm2
    conv = worker_conversation(stack.controller, MODEL)
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer(conv.get_prompt()).input_ids
    out = ar_greedy(model, ids, 48, [tokenizer.eos_token_id])
    return ids, out, tokenizer.decode(out, skip_special_tokens=True)


def chat(client, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}],
        **{"temperature": 0, "max_tokens": 48, **kwargs})


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_answer_equals_greedy_generate(client, greedy_chat):
    ids, out, text = greedy_chat
    reply = chat(client)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(out))
    assert usage.total_tokens == len(ids) + len(out)
    extra = usage.model_extra
    assert extra["jacobi_forwards"] >= 1 and extra["jacobi_tokens_per_forward"] >= 1.0
    print(f"\nchat: {text!r}, usage {usage.model_dump()}")


def test_streamed_chat_equals_greedy_generate(client, greedy_chat):
    deltas, reasons = [], []
    for chunk in chat(client, stream=True):
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(deltas) == greedy_chat[2]
    assert len([d for d in deltas if d]) > 1 and reasons[-1] == "stop"


def test_completion_max_tokens_is_exact(client, smollm2):
    model, tokenizer = smollm2
    prompt = "The three primary colors are"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    ids = tokenizer(prompt).input_ids
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 7)
    assert reply.choices[0].text == tokenizer.decode(ar_greedy(model, ids, 7),
                                                     skip_special_tokens=True)


def test_stop_strings_and_n_choices(client, greedy_chat):
    text = greedy_chat[2]
    word = text.split()[3]
    reply = chat(client, stop=[word], n=2)
    assert [c.message.content for c in reply.choices] == [text[: text.index(word)]] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    single = chat(client, stop=[word]).usage
    assert reply.usage.completion_tokens == 2 * single.completion_tokens
    assert reply.usage.prompt_tokens == 2 * single.prompt_tokens


def test_completion_logprobs_equal_a_plain_forward(client, smollm2):
    model, tokenizer = smollm2
    prompt = "The three primary colors are"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      logprobs=2)
    ids = tokenizer(prompt).input_ids
    generated = ar_greedy(model, ids, 6)
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1: -1].float()
    expected = logits.log_softmax(-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
    got = reply.choices[0].logprobs
    assert len(got.token_logprobs) == 6 and all(len(top) >= 2 for top in got.top_logprobs)
    assert torch.allclose(torch.tensor(got.token_logprobs), expected, atol=2e-3)


def test_chat_logprobs_equal_a_plain_forward(client, greedy_chat, smollm2):
    model, tokenizer = smollm2
    ids, out, text = greedy_chat
    reply = chat(client, logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    shown = out[:-1] if out[-1] == tokenizer.eos_token_id else out      # EOS is not shown
    assert "".join(e.token for e in entries) == reply.choices[0].message.content == text
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode()
    with torch.no_grad():
        logits = model(torch.tensor([ids + shown])).logits[0, len(ids) - 1: -1].float()
    expected = logits.log_softmax(-1)
    got = torch.tensor([e.logprob for e in entries])
    assert torch.allclose(got, expected.gather(1, torch.tensor(shown)[:, None])[:, 0], atol=2e-3)
    for entry, row in zip(entries, expected):
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=2e-3)
    assert chat(client).choices[0].logprobs is None


def test_streamed_chat_logprobs_arrive_with_their_text(client, greedy_chat):
    whole = chat(client, logprobs=True).choices[0].logprobs.content
    chunks = [c.choices[0] for c in chat(client, logprobs=True, stream=True)]
    for choice in chunks:
        pieces = choice.logprobs.content if choice.logprobs else []
        assert "".join(e.token for e in pieces) == (choice.delta.content or "")
    streamed = [e for c in chunks if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)
    assert [e.top_logprobs for e in streamed] == [[]] * len(streamed)
    assert "".join(c.delta.content or "" for c in chunks) == greedy_chat[2]


def test_stream_options_include_usage(client, greedy_chat):
    ids, out, _ = greedy_chat
    chunks = list(chat(client, stream=True, n=2, stream_options={"include_usage": True}))
    assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 2 * len(out)
    assert usage.prompt_tokens == 2 * len(ids) and usage.model_extra["jacobi_forwards"] >= 2
    completion = list(client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert completion[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chat(client, stream=True, max_tokens=4))


def test_seed_makes_sampled_choices_reproducible(client):
    import openai

    def sampled(**kwargs):
        reply = chat(client, temperature=0.9, max_tokens=24, **kwargs)
        return [c.message.content for c in reply.choices]

    pair = sampled(seed=7, n=2)
    assert sampled(seed=7, n=2) == pair and pair[0] != pair[1]
    assert sampled(seed=7) == pair[:1] and sampled(seed=8) == pair[1:]   # choice i: seed + i
    completion = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9)
    texts = {client.completions.create(**completion, seed=3).choices[0].text for _ in range(2)}
    assert len(texts) == 1
    with pytest.raises(openai.BadRequestError, match="seed"):
        chat(client, seed=-1)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(client, top_logprobs=2)


def test_streamed_completion_logprobs_are_per_chunk(client):
    request = dict(model=MODEL, prompt="The three primary colors are", max_tokens=12,
                   temperature=0, logprobs=1)
    whole = client.completions.create(**request).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**request, stream=True)]
    assert all("".join(c.logprobs.tokens) == c.text for c in chunks)
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [t for c in chunks for t in c.logprobs.text_offset] == whole.logprobs.text_offset
    assert "".join(c.text for c in chunks) == whole.text


def test_streamed_choices_are_numbered_across_prompts(client):
    request = dict(model=MODEL, prompt=["Red, green and", "One, two,"], max_tokens=3,
                   temperature=0, n=2)
    whole = client.completions.create(**request).choices
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [c.index for c in whole] == [0, 1, 2, 3]
    assert streamed == {c.index: c.text for c in whole}
    assert whole[0].text == whole[1].text != whole[2].text == whole[3].text


def test_completion_echo_with_logprobs_scores_the_prompt(client, smollm2):
    _, tokenizer = smollm2
    prompt = "The three primary colors are"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      echo=True, logprobs=0)
    got = reply.choices[0]
    count = len(tokenizer(prompt).input_ids)
    assert got.text.startswith(prompt) and len(got.logprobs.tokens) == count + 4
    assert got.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in got.logprobs.token_logprobs[1:])


def test_streamed_completion_echoes_the_prompt(client):
    prompt = "The three primary colors are"
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True)]
    assert "".join(parts).startswith(prompt) and len("".join(parts)) > len(prompt)


def test_unsupported_parameters_are_refused_with_a_code(client):
    import openai

    with pytest.raises(openai.BadRequestError) as penalty:
        chat(client, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError) as best_of:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, best_of=2)
    for error in (penalty.value, best_of.value):
        assert str(error.code) == "40302" and "not supported" in error.message


def test_status_answers_while_generating(client, stack):
    first = threading.Event()

    def long_request():
        for chunk in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Write a long story."}],
                temperature=0, max_tokens=160, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:   # the worker is decoding
                first.set()

    before = worker_status(stack.worker)["jacobi"]
    thread = threading.Thread(target=long_request)
    thread.start()
    assert first.wait(120)
    started = time.monotonic()
    busy = worker_status(stack.worker)
    elapsed = time.monotonic() - started
    thread.join(300)
    after = worker_status(stack.worker)["jacobi"]
    assert busy["queue_length"] == 1 and elapsed < 5
    assert after["requests"] == before["requests"] + 1 and after["forwards"] > before["forwards"]
    print(f"\nworker status: {after}")


def test_web_ui_chat_turn_in_headless_chromium(stack, greedy_chat):
    """A greedy chat turn in FastChat's UI: the greedy answer, and under it the line with its
    tokens per forward and tokens/s (the worker's usage); our model description, no error."""
    from playwright.sync_api import sync_playwright

    from fastchat_cllm.serving.web_ui import DESCRIPTION

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(stack.web, timeout=120_000)
            page.wait_for_selector("#input_box textarea", timeout=120_000)
            page.get_by_text("Parameters").click()
            for label, value in (("Temperature", "0"), ("Max output tokens", "48")):
                box = page.get_by_label(f"number input for {label}")
                box.fill(value)
                box.press("Enter")
            page.fill("#input_box textarea", QUESTION)
            page.click("button:has-text('Send')")
            answer = page.locator('[data-testid="bot"]').last
            page.wait_for_function("""() => {
                const bots = document.querySelectorAll('[data-testid="bot"]');
                const regen = [...document.querySelectorAll('button')].find(
                    b => b.innerText.includes('Regenerate'));
                return bots.length && regen && !regen.disabled; }""", timeout=180_000)
            page.screenshot(path=SCREENSHOT, full_page=True)
            text, stats = answer.inner_text().strip().rsplit("\n", 1)
            assert text.strip() == greedy_chat[2].strip()
            assert re.fullmatch(r"(\d+\.\d\d) tokens per forward · (\d+\.\d) tokens/s", stats), stats
            rate = float(stats.split()[0])
            assert 1.0 <= rate <= 48, stats
            assert DESCRIPTION in page.content()
            assert not page.get_by_text("Error", exact=True).is_visible()
        finally:
            browser.close()


def test_terminal_chat_streams_the_greedy_answer(terminal_chat, greedy_chat):
    output, _ = terminal_chat.communicate(timeout=START_TIMEOUT)
    assert terminal_chat.returncode == 0, output[-3000:]
    assert greedy_chat[2] in output, output[-3000:]


def test_serve_stops_everything_on_sigterm(stack):
    assert stack.stop() == 0
    assert "stopped web, api, worker, controller" in stack.lines
    for url in (stack.controller, stack.worker, stack.api, stack.web):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)
