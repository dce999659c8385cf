"""Prepacked linear layers (packed_linear): the same logits up to float rounding, the same
greedy and Jacobi outputs, every nn.Linear swapped, and refused where oneDNN cannot take them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import ar_greedy, chat_ids, random_prompts, tiny_model
from fastchat_cllm import jacobi_generate
from fastchat_cllm.core.engine import Engine
from fastchat_cllm.core.packed_linear import (PackedLinear, is_packed, pack_for_inference,
                                         pack_linears, packable)

from test_engine_smollm2 import QUESTIONS


def linears(model) -> tuple[int, int]:
    """(plain nn.Linear count, PackedLinear count)."""
    modules = list(model.modules())
    return (sum(type(m) is nn.Linear for m in modules),
            sum(isinstance(m, PackedLinear) for m in modules))


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 16, 40])
def test_packed_linear_matches_nn_linear(rows, one_thread):
    torch.manual_seed(rows)
    for bias in (True, False):
        linear = nn.Linear(24, 40, bias=bias)
        packed = PackedLinear(linear)
        x = torch.randn(2, rows, 24)
        with torch.inference_mode():
            y = packed(x)
            assert y.shape == (2, rows, 40)
            torch.testing.assert_close(y, linear(x), rtol=1e-5, atol=1e-5)


def test_a_tiny_model_packed_decodes_as_before(arch, one_thread):
    plain, packed = tiny_model(arch), tiny_model(arch)
    assert pack_linears(packed) == 2 * 7 + 1 and linears(packed) == (0, 15) and is_packed(packed)
    assert not is_packed(plain)
    for ids in random_prompts(4, seed=3):
        x = torch.tensor([ids])
        with torch.inference_mode():
            torch.testing.assert_close(packed(x).logits, plain(x).logits, rtol=1e-4, atol=1e-5)
        expected = ar_greedy(plain, ids, 24)
        assert ar_greedy(packed, ids, 24) == expected
        for options in (dict(), dict(window_size=8, adaptive=False)):
            assert jacobi_generate(packed, ids, max_new_tokens=24, **options).tokens == expected


def test_a_packed_batch_equals_its_requests_alone(one_thread):
    """The batched engine's packed forward (rows of several slots in one sequence) on a packed
    model: each request's output is the one it gets alone."""
    model = pack_for_inference(tiny_model("llama"))
    prompts = random_prompts(5, seed=7)
    engine = Engine(model, slots=len(prompts), max_len=64, chunk=64)
    ids = {engine.add(p, max_new_tokens=20, window_size=4, adaptive=False): i
           for i, p in enumerate(prompts)}
    out = {i: [] for i in range(len(prompts))}
    while engine.has_work:
        for request_id, step in engine.step():
            out[ids[request_id]] += step.tokens
    for i, prompt in enumerate(prompts):
        assert out[i] == ar_greedy(model, prompt, 20), i


def test_bfloat16_is_packed_and_close(one_thread):
    plain, packed = tiny_model("llama", torch.bfloat16), tiny_model("llama", torch.bfloat16)
    pack_linears(packed)
    x = torch.tensor([random_prompts(1, seed=4)[0]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).logits, plain(x).logits, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_are_refused_or_left_alone(dtype):
    model = tiny_model("llama", dtype)
    assert "float32 or bfloat16" in packable(model)
    with pytest.raises(ValueError, match="cannot pack the model's linear layers"):
        pack_linears(model)
    assert pack_for_inference(model) is model and linears(model) == (15, 0)


def test_smollm2_packed_gives_greedy_outputs_equal_to_the_plain_model(smollm2):
    """The real model: every projection and the (tied) output layer packed, the embedding kept;
    greedy and Jacobi outputs equal the plain model's greedy outputs."""
    from fastchat_cllm.loading import load

    plain, tokenizer = smollm2
    packed = load(None, dtype=torch.float32, device="cpu", pack=True)[0]
    assert linears(packed) == (0, 30 * 7 + 1)
    assert packed.get_input_embeddings().weight.data_ptr() != 0
    eos = [tokenizer.eos_token_id]
    for question in QUESTIONS:
        ids = chat_ids(tokenizer, question)
        expected = ar_greedy(plain, ids, 40, eos=eos)
        assert ar_greedy(packed, ids, 40, eos=eos) == expected, question
        out = jacobi_generate(packed, ids, max_new_tokens=40, eos_token_id=eos, window_size=16,
                              adaptive=False)
        assert out.tokens == expected, question
