"""The worker's logit_bias and prompt token ids: checked at the edge, honoured by generate_stream
(the real SmolLM2, fp32)."""
from __future__ import annotations

import pytest

from harness import ar_greedy, chat_ids
from fastchat_cllm.serving.params import MAX_LOGIT_BIAS, ParamError, parse_params

QUESTION = "What is the capital of France? Answer in one sentence."
NEW_TOKENS = 12
TYPE, RANGE = 40001, 40302          # FastChat's VALIDATION_TYPE_ERROR, PARAM_OUT_OF_RANGE


@pytest.mark.parametrize("bias, expected", [
    ({"33": 100, 7: -2.5, "0": 0}, ((0, 0.0), (7, -2.5), (33, 100.0))),
    ({}, ()), (None, ())])
def test_logit_bias_is_parsed_to_sorted_pairs(bias, expected):
    assert parse_params({"prompt": "x", "logit_bias": bias}).logit_bias == expected


@pytest.mark.parametrize("bias, code, message", [
    ([[33, 1.0]], TYPE, "'logit_bias' must map token ids to numbers"),
    ({"a": 1.0}, TYPE, "'logit_bias' keys must be token ids"),
    ({"-3": 1.0}, TYPE, "'logit_bias' keys must be token ids"),
    ({True: 1.0}, TYPE, "'logit_bias' keys must be token ids"),
    ({"33": 100.5}, RANGE, r"'logit_bias' values must be numbers in \[-100, 100\]"),
    ({"33": float("inf")}, RANGE, "'logit_bias' values must be numbers"),
    ({"33": "5"}, RANGE, "'logit_bias' values must be numbers"),
    ({"33": 1.0, "033": 2.0}, RANGE, "'logit_bias' names a token id twice"),
    ({str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, RANGE, "at most 300 tokens"),
    ({"96": 1.0}, RANGE, "'logit_bias' token id 96 is outside the model's vocabulary of 96"),
])
def test_bad_logit_bias_is_refused(bias, code, message):
    with pytest.raises(ParamError, match=message) as error:
        parse_params({"prompt": "x", "logit_bias": bias}, vocab_size=96)
    assert error.value.code == code


def test_prompt_token_ids_are_parsed():
    request = parse_params({"prompt": "ab", "prompt_token_ids": [5, 0, 95]}, vocab_size=96)
    assert request.prompt_token_ids == (5, 0, 95) and request.prompt == "ab"
    assert parse_params({"prompt_token_ids": [5]}).prompt == ""      # the text is optional
    assert parse_params({"prompt": "ab"}).prompt_token_ids is None


@pytest.mark.parametrize("ids, code, message", [
    ([], TYPE, "'prompt' as token ids must be a non-empty list"),
    ([3, -1], TYPE, "'prompt' as token ids must be a non-empty list"),
    ([3, "4"], TYPE, "'prompt' as token ids must be a non-empty list"),
    ([3, True], TYPE, "'prompt' as token ids must be a non-empty list"),
    ("3 4", TYPE, "'prompt' as token ids must be a non-empty list"),
    ([3, 96], RANGE, "'prompt' token id 96 is outside the model's vocabulary of 96"),
])
def test_bad_prompt_token_ids_are_refused(ids, code, message):
    with pytest.raises(ParamError, match=message) as error:
        parse_params({"prompt": "x", "prompt_token_ids": ids}, vocab_size=96)
    assert error.value.code == code


@pytest.fixture(scope="module")
def chat(smollm2):
    """(model, tokenizer, the chat prompt's text, its ids)."""
    model, tokenizer = smollm2
    text = tokenizer.decode(chat_ids(tokenizer, QUESTION))
    return model, tokenizer, text, tokenizer(text).input_ids


def run(chat, **params) -> list[dict]:
    """generate_stream's chunks without the Jacobi counts (the adaptive window follows timings,
    so two runs may take different forwards to the same tokens)."""
    from fastchat_cllm.serving.stream import generate_stream

    model, tokenizer, text, _ = chat
    params = {"prompt": text, "temperature": 0, "echo": False, "max_new_tokens": NEW_TOKENS,
              **params}
    chunks = list(generate_stream(model, tokenizer, params, context_len=8192, stream_interval=4))
    for chunk in chunks:
        chunk["usage"] = {k: v for k, v in chunk["usage"].items() if not k.startswith("jacobi")}
    return chunks


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.slow
def test_logit_bias_greedy_text_equals_generate_with_the_bias(chat):
    model, tokenizer, _, ids = chat
    eos = [tokenizer.eos_token_id]
    free = ar_greedy(model, ids, NEW_TOKENS, eos)
    bias = {free[0]: -100.0, free[2]: 4.0}
    expected = ar_greedy(model, ids, NEW_TOKENS, eos, bias)
    assert expected != free and free[0] not in expected
    last = run(chat, logit_bias={str(t): b for t, b in bias.items()})[-1]
    assert last["text"] == decode(tokenizer, expected)
    assert run(chat)[-1]["text"] == decode(tokenizer, free)


@pytest.mark.slow
def test_sampling_follows_the_bias_and_logprobs_stay_raw(chat):
    _, tokenizer, _, _ = chat
    token = tokenizer.convert_tokens_to_ids("Ġbanana")
    assert token != tokenizer.unk_token_id
    last = run(chat, temperature=0.7, seed=3, max_new_tokens=4, logprobs=0,
               logit_bias={str(token): 100})[-1]
    assert last["text"] == decode(tokenizer, [token] * 4)
    assert all(value < -1 for value in last["logprobs"]["token_logprobs"])   # the model's own


@pytest.mark.slow
def test_bias_outside_the_vocabulary_is_refused_before_decoding(chat):
    model = chat[0]
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ParamError, match=f"'logit_bias' token id {vocab} is outside"):
        run(chat, logit_bias={str(vocab): 1.0})
    with pytest.raises(ParamError, match=f"'prompt' token id {vocab} is outside"):
        run(chat, prompt_token_ids=[5, vocab])


@pytest.mark.slow
def test_prompt_token_ids_are_fed_instead_of_the_text(chat):
    _, _, text, ids = chat
    by_text = run(chat)
    assert run(chat, prompt_token_ids=ids) == by_text
    assert run(chat, prompt="Some other text.", prompt_token_ids=ids) == by_text
    assert by_text[-1]["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.slow
def test_ids_that_no_text_tokenizes_to_are_fed_verbatim(chat):
    from fastchat_cllm import jacobi_generate

    model, tokenizer, _, _ = chat
    letters = tokenizer.convert_tokens_to_ids(list("Paris"))        # one token per letter
    assert tokenizer("Paris").input_ids != letters                  # not a text's tokens
    last = run(chat, prompt="Paris", prompt_token_ids=letters, echo=True, logprobs=0)[-1]
    assert last["usage"]["prompt_tokens"] == len(letters)
    assert last["logprobs"]["tokens"][: len(letters)] == list("Paris")
    out = jacobi_generate(model, letters, max_new_tokens=NEW_TOKENS,
                          eos_token_id=tokenizer.eos_token_id)
    assert last["text"] == "Paris" + decode(tokenizer, out.tokens)
