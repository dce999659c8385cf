"""FastChat's generate-stream contract over the Jacobi engine, on the real SmolLM2 (fp32)."""
from __future__ import annotations

import pytest

from harness import ar_greedy, chat_ids

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def chat(smollm2):
    """(model, tokenizer, prompt built by the worker's template, its ids, greedy answer ids)."""
    from fastchat.model.model_adapter import get_conversation_template

    from fastchat_cllm.serving.adapter import CllmAdapter

    model, tokenizer = smollm2
    CllmAdapter.tokenizers["smollm2-135m-instruct"] = tokenizer
    conv = get_conversation_template("smollm2-135m-instruct")
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    ids = tokenizer(prompt).input_ids
    return model, tokenizer, prompt, ids, ar_greedy(model, ids, 48, [tokenizer.eos_token_id])


def run(chat, context_len=8192, stream_interval=1, **params):
    from fastchat_cllm.serving.stream import generate_stream

    model, tokenizer, prompt = chat[:3]
    params = {"prompt": prompt, "temperature": 0, "echo": False, "max_new_tokens": 48, **params}
    return list(generate_stream(model, tokenizer, params, context_len=context_len,
                                stream_interval=stream_interval))


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_template_is_the_tokenizers_own_chat_format(chat):
    _, tokenizer, prompt, ids, _ = chat
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ids == chat_ids(tokenizer, QUESTION)


def test_greedy_stream_equals_generate_and_never_shrinks(chat):
    _, tokenizer, _, ids, greedy = chat
    chunks = run(chat)
    texts = [c["text"] for c in chunks]
    assert texts[-1] == decode(tokenizer, greedy)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    last = chunks[-1]
    assert last["finish_reason"] == ("stop" if greedy[-1] == tokenizer.eos_token_id else "length")
    usage = last["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), len(greedy))
    assert usage["total_tokens"] == len(ids) + len(greedy)
    assert usage["jacobi_forwards"] >= 1 and usage["jacobi_tokens_per_forward"] >= 1.0
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_max_new_tokens_is_exact(chat):
    _, tokenizer, _, _, greedy = chat
    last = run(chat, max_new_tokens=5)[-1]
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 5
    assert last["text"] == decode(tokenizer, greedy[:5])


def test_stop_string_cuts_text_and_counts_tokens_up_to_it(chat):
    _, tokenizer, _, _, greedy = chat
    full = decode(tokenizer, greedy)
    word = full.split()[3]                        # a word in the middle of the answer
    needed = next(n for n in range(1, len(greedy) + 1) if word in decode(tokenizer, greedy[:n]))
    chunks = run(chat, stop=["never appears", word])
    assert chunks[-1]["text"] == full[: full.index(word)]
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == needed


def test_partial_stop_strings_are_held_back(chat):
    _, tokenizer, _, _, greedy = chat
    full = decode(tokenizer, greedy)
    stop = full[5:12] + "\x07"                     # shares 7 characters with the answer
    chunks = run(chat, stop=stop)
    for chunk in chunks[:-1]:
        assert not any(chunk["text"].endswith(stop[:k]) for k in range(1, len(stop)))
    assert chunks[-1]["text"] == full             # never completed: the whole answer


def test_stop_token_id_ends_the_answer_and_is_counted(chat):
    _, tokenizer, _, _, greedy = chat
    last = run(chat, stop_token_ids=[greedy[3]])[-1]
    cut = greedy.index(greedy[3]) + 1
    assert last["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == cut
    assert last["text"] == decode(tokenizer, greedy[: cut - 1])


def test_echo_returns_prompt_then_answer(chat):
    _, tokenizer, _, ids, greedy = chat
    last = run(chat, echo=True, max_new_tokens=6)[-1]
    assert last["text"] == decode(tokenizer, ids + greedy[:6])


def test_prompt_is_cut_to_the_context(chat):
    model, tokenizer, _, ids, _ = chat
    last = run(chat, context_len=30, max_new_tokens=10)[-1]
    kept = ids[-20:]
    assert last["usage"]["prompt_tokens"] == 20
    assert last["text"] == decode(tokenizer, ar_greedy(model, kept, 10, [tokenizer.eos_token_id]))


def test_no_room_for_the_prompt_is_a_context_overflow(chat):
    from fastchat_cllm.serving.params import ParamError

    with pytest.raises(ParamError) as error:
        run(chat, context_len=30, max_new_tokens=30)
    assert error.value.code == 40303


def test_stream_interval_spaces_chunks(chat):
    chunks = run(chat, stream_interval=4)
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert len(chunks) >= 3
    assert all(b - a >= 4 for a, b in zip(counts, counts[1:]))


def test_sampled_requests_follow_the_same_contract(chat):
    chunks = run(chat, temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=12)
    last = chunks[-1]
    assert last["finish_reason"] in ("stop", "length") and last["text"]
    assert 1 <= last["usage"]["completion_tokens"] <= 12
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
