"""The worker's stream samples with the Jacobi engine and reports logprobs (real SmolLM2, fp32)."""
from __future__ import annotations

import pytest
import torch

from harness import chat_ids, forward_logprobs

pytestmark = pytest.mark.slow
QUESTION = "Give me two words that rhyme with cat."


def prompt(tokenizer) -> str:
    return tokenizer.decode(chat_ids(tokenizer, QUESTION))


def run(smollm2, jacobi=None, **params):
    from fastchat_cllm.serving.stream import generate_stream

    model, tokenizer = smollm2
    params = {"prompt": prompt(tokenizer), "echo": False, "max_new_tokens": 24, **params}
    return list(generate_stream(model, tokenizer, params, context_len=8192, stream_interval=3,
                                jacobi=jacobi))


def direct(smollm2, **options):
    """The engine called directly on the worker's prompt ids (block size 1: AR sampling)."""
    from fastchat_cllm import jacobi_generate

    model, tokenizer = smollm2
    ids = tokenizer(prompt(tokenizer)).input_ids
    return ids, jacobi_generate(model, ids, max_new_tokens=24, window_size=1,
                                eos_token_id=tokenizer.eos_token_id, **options)


def test_sampled_request_runs_the_jacobi_engine_reproducibly(smollm2):
    _, tokenizer = smollm2
    params = dict(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=11)
    first, again = run(smollm2, **params)[-1], run(smollm2, **params)[-1]
    assert first["text"] == again["text"] and first["usage"]["jacobi_forwards"] >= 1
    _, out = direct(smollm2, **params)
    assert first["text"] == tokenizer.decode(out.tokens, skip_special_tokens=True)
    others = {run(smollm2, temperature=0.9, max_new_tokens=8)[-1]["text"] for _ in range(3)}
    assert len(others) >= 2          # no seed given: a fresh one per request


def test_worker_flag_picks_the_speculative_rule(smollm2):
    from fastchat_cllm.serving.options import jacobi_config
    from fastchat_cllm.serving.worker import build_parser

    parser = build_parser()
    assert jacobi_config(parser, parser.parse_args([])).acceptance == "gumbel"
    config = jacobi_config(parser, parser.parse_args(
        ["--acceptance", "speculative", "--no-adaptive", "--window-size", "6"]))
    assert config.acceptance == "speculative"
    params = dict(temperature=0.9, seed=4)
    first, again = (run(smollm2, jacobi=config, **params)[-1] for _ in range(2))
    assert first["text"] == again["text"] and first["usage"]["jacobi_forwards"] >= 1
    coupled = run(smollm2, jacobi=config.with_(acceptance="gumbel"), **params)[-1]
    assert coupled["text"] != first["text"]          # other randomness, another sample


def test_logprobs_chunks_follow_fastchat_format(smollm2):
    model, tokenizer = smollm2
    params = dict(temperature=0.7, top_p=0.9, seed=5)
    chunks = run(smollm2, logprobs=2, **params)
    last = chunks[-1]["logprobs"]
    assert set(last) == {"text_offset", "tokens", "token_logprobs", "top_logprobs", "detail"}
    assert "".join(last["tokens"]) == chunks[-1]["text"]
    assert b"".join(bytes(d["bytes"]) for d in last["detail"]) == chunks[-1]["text"].encode()
    assert all([alt[0] for alt in d["top"]] == list(top) for d, top in
               zip(last["detail"], last["top_logprobs"]))
    assert last["text_offset"] == [len("".join(last["tokens"][:i]))
                                   for i in range(len(last["tokens"]))]
    for chunk in chunks[:-1]:                          # cumulative, like the text
        n = len(chunk["logprobs"]["tokens"])
        assert chunk["logprobs"]["token_logprobs"] == last["token_logprobs"][:n]
    ids, out = direct(smollm2, **params)
    shown = out.tokens[:-1] if out.finish_reason == "stop" else out.tokens   # EOS not shown
    assert len(last["token_logprobs"]) == len(shown)
    expected = forward_logprobs(model, ids, shown)[torch.arange(len(shown)), shown]
    assert torch.allclose(torch.tensor(last["token_logprobs"]), expected, atol=2e-3)
    for top, row in zip(last["top_logprobs"], forward_logprobs(model, ids, shown)):
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(),
                                                                   abs=2e-3)


def test_tokens_holding_part_of_a_character_keep_their_bytes(smollm2):
    """'🎉' is three byte-level tokens that each decode to U+FFFD alone."""
    from fastchat_cllm.core.logprobs import TokenLogprob
    from fastchat_cllm.serving.logprobs import AnswerLogprobs

    _, tokenizer = smollm2
    ids = tokenizer(" 🎉 日本").input_ids
    answer = AnswerLogprobs(tokenizer, [tokenizer.eos_token_id])
    answer.add([TokenLogprob(t, -1.0, tuple((alt, -2.0) for alt in ids[:3])) for t in ids])
    chunk = answer.chunk(ids)
    assert "\ufffd" in "".join(chunk["tokens"])
    assert b"".join(bytes(d["bytes"]) for d in chunk["detail"]) == " 🎉 日本".encode()
    top = chunk["detail"][0]["top"]
    assert [bytes(b) for _, _, b in top] == [bytes(d["bytes"]) for d in chunk["detail"][:3]]
    assert len(chunk["top_logprobs"][0]) < 3          # the text-keyed map merges them


def test_logprobs_without_alternatives_and_off(smollm2):
    bare = run(smollm2, temperature=0, logprobs=0, max_new_tokens=6)[-1]["logprobs"]
    assert bare["top_logprobs"] == [{}] * len(bare["tokens"]) and len(bare["tokens"]) >= 1
    assert run(smollm2, temperature=0, max_new_tokens=4)[-1]["logprobs"] is None


def test_echo_with_logprobs_scores_the_prompt_too(smollm2):
    model, tokenizer = smollm2
    text = "The three primary colors are"
    ids = tokenizer(text).input_ids
    last = run(smollm2, prompt=text, temperature=0, logprobs=1, echo=True, max_new_tokens=5)[-1]
    lp = last["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + 5 and "".join(lp["tokens"]) == last["text"]
    assert last["text"].startswith(text) and lp["text_offset"][len(ids)] == len(text)
    answer = run(smollm2, prompt=text, temperature=0, logprobs=1, max_new_tokens=5)[-1]
    assert lp["token_logprobs"][len(ids):] == pytest.approx(answer["logprobs"]["token_logprobs"],
                                                            abs=1e-4)
    expected = forward_logprobs(model, ids[:1], ids[1:])[torch.arange(len(ids) - 1), ids[1:]]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:len(ids)]), expected, atol=2e-3)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize("params", [{"logprobs": 21}, {"logprobs": -1}, {"seed": -3}])
def test_unsupported_logprobs_requests_are_refused(smollm2, params):
    from fastchat_cllm.serving.params import ParamError

    with pytest.raises(ParamError) as error:
        run(smollm2, **params)
    assert error.value.code == 40302
