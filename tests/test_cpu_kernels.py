"""The C++ CPU kernels (core/cpu_kernels.py) against torch: the engine's packed attention
against its SDPA path (`attend`) over several groups, non-consecutive slots and grouped-query
heads, a row's output alone equal to it among others; the GGUF linear kernel split over
threads and neuron chunks equal, bit for bit, to one thread."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from fastchat_cllm.core import cpu_kernels
from fastchat_cllm.core.engine.runner import Row, attend, encode, pack
from fastchat_cllm.core.gguf_linear import GGUFLinear


@pytest.fixture(scope="module", autouse=True)
def kernels():
    cpu_kernels.load()


def stores(slots=6, kv_heads=3, length=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, kv_heads, length, dim, generator=g),
            torch.randn(slots, kv_heads, length, dim, generator=g))


def native(query, key, value, groups, scale):
    return torch.ops.fastchat_cllm_cpu.packed_attention(query, key, value, *encode(groups), scale)


@pytest.mark.parametrize("dim", [16, 12])       # 12: not a multiple of the vector width
def test_packed_attention_equals_sdpa_per_group(dim):
    key, value = stores(dim=dim)
    rows = [Row(4, [1, 2, 3], range(3)), Row(1, [5], range(1)), Row(2, [6, 7, 8], range(3)),
            Row(5, [9], range(1)), Row(0, [1, 2], range(2))]
    starts = [7, 20, 0, 33, 12]                     # cached tokens of each row's slot
    _, groups = pack(rows, starts, "cpu")
    total = sum(len(r.tokens) for r in rows)
    query = torch.randn(1, 9, total, dim)           # 9 query heads over 3 key/value heads
    scale = dim ** -0.5
    got = native(query, key, value, groups, scale)
    want = attend(query, key, value, groups, scale)
    assert got.shape == want.shape == (1, total, 9, dim)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_rows_attention_does_not_depend_on_the_rows_beside_it():
    key, value = stores()
    rows = [Row(3, [1, 2, 3, 4], range(4)), Row(0, [5, 6, 7, 8], range(4)), Row(5, [1], range(1))]
    starts = [10, 25, 3]
    order, groups = pack(rows, starts, "cpu")
    total = sum(len(r.tokens) for r in rows)
    query = torch.randn(1, 9, total, 16)
    together = native(query, key, value, groups, 0.25)
    at = 0
    for r in order:                                  # each row again, alone
        width = len(rows[r].tokens)
        _, alone_groups = pack([rows[r]], [starts[r]], "cpu")
        alone = native(query[:, :, at: at + width].contiguous(), key, value, alone_groups, 0.25)
        assert torch.equal(alone[0], together[0, at: at + width])
        at += width


def test_packed_attention_refuses_a_slot_out_of_range():
    key, value = stores(slots=2)
    _, groups = pack([Row(1, [1], range(1))], [3], "cpu")
    meta, mask = encode(groups)
    meta[-1] = 7
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.fastchat_cllm_cpu.packed_attention(torch.randn(1, 3, 1, 16), key, value,
                                                      meta, mask, 0.25)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_linear_split_over_threads_and_chunks_equals_one_thread(qtype):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3000, 576)).astype(np.float32)   # many tasks and chunks
    layer = GGUFLinear(gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype]), qtype,
                       576)
    x = torch.randn(9, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        two = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_low_rank_delta_equals_torch_and_rows_are_independent():
    x, a, bt = torch.randn(19, 100), torch.randn(8, 100), torch.randn(8, 37)  # K off the width
    together = torch.ops.fastchat_cllm_cpu.low_rank(x, a, bt)
    assert torch.allclose(together.double(), x.double() @ a.double().T @ bt.double(),
                          rtol=1e-5, atol=1e-4)
    for start, count in ((0, 1), (4, 3), (2, 16)):
        alone = torch.ops.fastchat_cllm_cpu.low_rank(x[start: start + count], a, bt)
        assert torch.equal(alone, together[start: start + count])
