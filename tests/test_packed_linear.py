"""Prepacked linear layers (packed_linear): the same logits up to float rounding, the same
greedy and Jacobi outputs, every nn.Linear swapped, and refused (nothing swapped) where the dtype
or oneDNN cannot take them."""
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


def test_a_packed_batch_decodes_each_request_as_greedy(one_thread):
    """The batched engine (rows of several slots in one packed sequence) on a packed model:
    each request's output is the plain model's greedy output, and the sizer prices the step as
    a packed one."""
    model, plain = pack_for_inference(tiny_model("llama")), tiny_model("llama")
    prompts = random_prompts(5, seed=7)
    engine = Engine(model, slots=len(prompts), max_len=64, chunk=64)
    assert is_packed(model) and engine.cost_kind == "cpu-packed"
    ids = {engine.add(p, max_new_tokens=20, window_size=4, adaptive=False): i
           for i, p in enumerate(prompts)}
    out = {i: [] for i in range(len(prompts))}
    while engine.has_work:
        for request_id, step in engine.step():
            out[ids[request_id]] += step.tokens
    for i, prompt in enumerate(prompts):
        assert out[i] == ar_greedy(plain, prompt, 20), i


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no oneDNN bfloat16 kernels")
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


def test_a_layer_kept_in_another_dtype_is_left_as_it_is():
    model = tiny_model("llama")
    model.lm_head.double()
    assert pack_linears(model) == 14 and linears(model) == (1, 14)


def test_smollm2_packed_gives_greedy_outputs_equal_to_the_plain_model(smollm2):
    """The real model on its dequantized fp32 weights (quantized=False: `pack` alone keeps a
    GGUF's blocks, gguf_linear): every projection and the (tied) output layer packed, the
    embedding kept; greedy and Jacobi outputs equal the plain model's greedy outputs."""
    from fastchat_cllm.loading import load

    plain, tokenizer = smollm2
    packed = load(None, dtype=torch.float32, device="cpu", pack=True, quantized=False)[0]
    assert linears(packed) == (0, 30 * 7 + 1)
    assert type(packed.get_input_embeddings()) is nn.Embedding
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    eos = [tokenizer.eos_token_id]
    for question in QUESTIONS:
        ids = chat_ids(tokenizer, question)
        expected = ar_greedy(plain, ids, 40, eos=eos)
        assert ar_greedy(packed, ids, 40, eos=eos) == expected, question
        out = jacobi_generate(packed, ids, max_new_tokens=40, eos_token_id=eos, window_size=16,
                              adaptive=False)
        assert out.tokens == expected, question


def test_a_packed_model_refuses_what_it_cannot_do(one_thread):
    """Inference only: no backward, no state_dict, no other dtype or device, no compile; each a
    clear error, not a silent wrong result."""
    model = pack_for_inference(tiny_model("llama"))
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no state_dict"):
        model.state_dict()
    with pytest.raises(ValueError, match="stays on the CPU in torch.float32"):
        model.to(torch.float64)
    model.to("cpu").float()                 # what changes nothing is allowed
    layer = model.lm_head
    x = torch.randn(2, layer.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        layer(x)
    with pytest.raises(ValueError, match="got torch.float64 input"):
        layer(torch.randn(2, layer.in_features, dtype=torch.float64))
    with pytest.raises(ValueError, match="compiled step takes the model loaded without pack"):
        Engine(model, slots=1, max_len=32, compile=True)


def test_the_workers_eager_step_runs_packed_and_a_failed_compile_falls_back_to_it(one_thread):
    """build_engine (the worker's): --compile off packs the model; under auto, a step that
    cannot compile falls back to the eager step, packed too, and decodes as greedy."""
    from fastchat_cllm.serving.worker import build_engine

    engine = build_engine(tiny_model("qwen2"), 2, 64, 16, compile=False)
    assert is_packed(engine.model) and engine.cost_kind == "cpu-packed"
    model = tiny_model("llama")
    model.model.embed_tokens.register_forward_hook(lambda *_: torch._dynamo.graph_break())
    engine = build_engine(model, 2, 64, 16, compile=True, required=False)
    assert engine.runner.compiled is None and is_packed(model)
    engine.add([5, 6, 7], max_new_tokens=6)
    tokens = []
    while engine.has_work:
        tokens += [t for _, step in engine.step() for t in step.tokens]
    assert tokens == ar_greedy(tiny_model("llama"), [5, 6, 7], 6)


def test_where_onednn_refuses_nothing_is_swapped(monkeypatch, caplog):
    def refuse(self, x):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(PackedLinear, "forward", refuse)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="oneDNN refused: could not create a primitive"):
        pack_linears(model)
    assert linears(model) == (15, 0)
    with caplog.at_level("WARNING"):
        assert pack_for_inference(model) is model and linears(model) == (15, 0)
    assert "running torch's nn.Linear instead" in caplog.text
