"""GGUF weights kept quantized (core/gguf_linear.py): the kernel against the dequantized
matrix for each block type, rows that do not change each other, the real SmolLM2 file swapped
layer by layer, Jacobi equal to AR on it, its agreement with the float32 path, the shipped
CLLM's LoRA unmerged on the quantized base, and bad files."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from harness import chat_ids
from fastchat_cllm import jacobi_generate, loading
from fastchat_cllm.core import cpu_kernels, gguf_linear
from fastchat_cllm.core.gguf_linear import GGUFLinear

TYPES = ("Q4_0", "Q4_1", "Q8_0")


def quantized_layer(qtype: str, out_features: int, in_features: int, seed: int = 0):
    """(GGUFLinear, its weight dequantized as float64) for a random weight quantized by gguf-py."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weight, kind)
    values = torch.from_numpy(gguf.quants.dequantize(blocks, kind)).double()
    return GGUFLinear(blocks, qtype, in_features), values


@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_equals_the_dequantized_matrix(qtype):
    cpu_kernels.load()
    layer, values = quantized_layer(qtype, 13, 96)       # 13: no multiple of any tile
    for rows in (1, 2, 3, 4, 5, 9, 16, 17, 23):
        x = torch.randn(rows, 96)
        exact = x.double() @ values.T
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 13)
        assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-4), (qtype, rows)
    assert layer(torch.randn(2, 5, 96)).shape == (2, 5, 13)
    assert layer(torch.randn(0, 96)).shape == (0, 13)


@pytest.mark.parametrize("qtype", TYPES)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(qtype):
    """Bit for bit: what makes a Jacobi window's logits those of AR steps."""
    cpu_kernels.load()
    layer, _ = quantized_layer(qtype, 20, 128, seed=1)
    x = torch.randn(11, 128)
    together = layer(x)
    for start in range(11):
        for count in (1, 2, 3, 5):
            alone = layer(x[start: start + count])
            assert torch.equal(alone, together[start: start + count])
    x = torch.randn(45, 128)                 # and many rows (several tiles of 6)
    together = layer(x)
    for start, count in ((0, 17), (5, 20), (3, 40)):
        assert torch.equal(layer(x[start: start + count]), together[start: start + count])


def test_lora_delta_is_added_unmerged():
    cpu_kernels.load()
    layer, values = quantized_layer("Q4_1", 8, 64)
    a, b = torch.randn(4, 64), torch.randn(8, 4)
    layer.add_lora(a, b, 0.5)
    x = torch.randn(3, 64)
    exact = x.double() @ (values + 0.5 * b.double() @ a.double()).T
    assert torch.allclose(layer(x).double(), exact, rtol=1e-5, atol=1e-4)


def test_a_layer_refuses_what_it_cannot_do():
    cpu_kernels.load()
    layer, _ = quantized_layer("Q8_0", 4, 32)
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(1, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="CPU in float32"):
        layer.double()
    with pytest.raises(ValueError, match="state_dict"):
        layer.state_dict()
    with pytest.raises(ValueError, match="does not run"):
        GGUFLinear(np.zeros((4, 10), np.uint8), "Q4_K", 256)


@pytest.fixture(scope="module")
def quantized():
    """The default model with its GGUF weights kept quantized, and its tokenizer."""
    return loading.load(None, dtype=torch.float32, quantized=True)


@pytest.mark.slow
def test_every_linear_layer_of_smollm2_reads_the_files_blocks(quantized):
    model, _ = quantized
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(layers) == 211                        # 30 x 7 projections + the output layer
    assert {m.qtype for m in layers} == {"Q4_1", "Q8_0"}
    assert model.lm_head.qtype == "Q8_0"             # the tied embedding matrix, as stored
    read = sum(m.nbytes for m in layers)
    assert 90e6 < read < 115e6                       # the file's 96 MB, scales as float32


@pytest.mark.slow
def test_quantized_model_agrees_with_the_float32_path(quantized, smollm2):
    """Teacher-forced: the quantized path's greedy tokens are the float32 path's argmax at
    >= 99.5% of positions (the same weights; only the order of float sums differs)."""
    model, tokenizer = quantized
    plain, _ = smollm2
    agree = total = 0
    for question in ("Write a Python function that reverses a string.",
                     "What is the capital of France?", "Explain recursion briefly."):
        ids = chat_ids(tokenizer, question)
        out = jacobi_generate(model, ids, max_new_tokens=48, window_size=1).tokens
        seq = torch.tensor([ids + out])
        with torch.inference_mode():
            a = model(seq).logits[0, len(ids) - 1: -1].argmax(-1)
            b = plain(seq).logits[0, len(ids) - 1: -1].argmax(-1)
        assert a.tolist() == out
        agree += int((a == b).sum())
        total += len(out)
    assert agree / total >= 0.995, f"{agree}/{total}"


@pytest.mark.slow
@pytest.mark.parametrize("window", [2, 6, 16])
def test_jacobi_on_quantized_weights_equals_ar(quantized, window):
    model, tokenizer = quantized
    ids = chat_ids(tokenizer, "Write a Python function that checks whether a number is prime.")
    ar = jacobi_generate(model, ids, max_new_tokens=64, window_size=1, prompt_lookup=0).tokens
    jacobi = jacobi_generate(model, ids, max_new_tokens=64, window_size=window).tokens
    assert jacobi == ar


@pytest.mark.slow
def test_the_shipped_cllm_runs_as_quantized_base_plus_its_lora(smollm2):
    quantized, tokenizer = loading.load(loading.CLLM_MODEL, dtype=torch.float32, quantized=True)
    merged, _ = loading.load(loading.CLLM_MODEL, dtype=torch.float32)
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, GGUFLinear) and q_proj.lora is not None
    assert q_proj.lora[0].dtype == torch.float32                  # the delta, not re-quantized
    ids = chat_ids(tokenizer, "def fibonacci(n):")
    with torch.inference_mode():
        a, b = quantized(torch.tensor([ids])).logits, merged(torch.tensor([ids])).logits
    assert (a - b).abs().max() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # Jacobi equals AR on it: the LoRA term too is computed row by row
    ar = jacobi_generate(quantized, ids, max_new_tokens=48, window_size=1, prompt_lookup=0)
    for window in (4, 16):
        assert jacobi_generate(quantized, ids, max_new_tokens=48,
                               window_size=window).tokens == ar.tokens


@pytest.mark.slow
def test_a_truncated_gguf_is_refused_naming_the_file(tmp_path):
    source = loading.smollm2_gguf()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(source.read_bytes()[: 5 * 2**20])
    with pytest.raises(ValueError, match=r"broken\.gguf is not a whole GGUF file"):
        loading.load(str(broken), dtype=torch.float32, quantized=True)


@pytest.mark.slow
def test_layers_of_other_types_stay_dequantized_with_a_warning(quantized, caplog, monkeypatch):
    """A type the kernel does not run (here: Q8_0 taken out of its list) is left float32,
    named in the log, and the model still computes the same logits (to float rounding)."""
    monkeypatch.setattr(gguf_linear, "KERNEL_TYPES", {"Q4_1": 20})
    model, tokenizer = loading.load(None, dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        report = gguf_linear.keep_quantized(model, loading.smollm2_gguf())
    assert report.kept == {"lm_head": "its type Q8_0 has no kernel here"}
    assert type(model.lm_head) is torch.nn.Linear
    assert "lm_head stays dequantized" in caplog.text
    ids = torch.tensor([chat_ids(tokenizer, "Name three colours.")])
    full, _ = quantized
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, full(ids).logits, atol=1e-3, rtol=1e-4)
