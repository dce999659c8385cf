"""Greedy Jacobi decoding equals transformers' greedy generate, token for token (fp32/fp64).
Each reference is computed once (tiny_greedy) however many modes and block sizes use it."""
from __future__ import annotations

import pytest
import torch

from harness import ARCHITECTURES, tiny_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate, jacobi_stream

BLOCK_SIZES = (1, 2, 7, 16, 32)
MODES = {
    "adaptive": dict(),
    "sliding": dict(adaptive=False),
    "fixed": dict(adaptive=False, fixed_blocks=True),
    "fixed-random": dict(adaptive=False, fixed_blocks=True, fill="random"),
}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return tiny_model(arch)


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window_size", BLOCK_SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_ar_greedy(arch, model, window_size, mode):
    for length, max_new in ((1, 37), (9, 50), (40, 23)):
        ids = prompt(length, seed=length)
        expected = tiny_greedy(arch, ids, max_new)
        out = jacobi_generate(model, ids, max_new_tokens=max_new, window_size=window_size,
                              **MODES[mode])
        assert out.tokens == expected
        assert out.finish_reason == "length"
        assert out.stats.tokens == max_new


def test_equals_ar_greedy_fp64():
    model = tiny_model("llama", dtype=torch.float64, seed=3)
    ids = prompt(12)
    expected = tiny_greedy("llama", ids, 45, dtype=torch.float64, seed=3)
    for window_size in (3, 16):
        out = jacobi_generate(model, ids, max_new_tokens=45, window_size=window_size)
        assert out.tokens == expected


def eos_inside_a_block(arch, ids, window_size):
    """An EOS id whose first appearance in the greedy output is not at a block boundary."""
    free = tiny_greedy(arch, ids, 60)
    found = [(tok, free[: i + 1]) for i, tok in enumerate(free)
             if i > 3 and i % window_size not in (0, 1) and tok not in free[:i]]
    assert found, f"{arch}: no token first appears inside a block; choose another prompt"
    return found[0]


@pytest.mark.parametrize("mode", MODES)
def test_eos_inside_block_ends_output(arch, model, mode):
    ids = prompt(6, seed=4)
    eos, expected = eos_inside_a_block(arch, ids, 16)
    assert tiny_greedy(arch, ids, 60, eos=[eos]) == expected
    out = jacobi_generate(model, ids, max_new_tokens=60, window_size=16, eos_token_id=[eos],
                          **MODES[mode])
    assert out.tokens == expected          # EOS included, nothing after it
    assert out.finish_reason == "stop"
    assert out.stats.tokens == len(expected)


def test_several_eos_ids_first_one_hit_wins(arch, model):
    ids = prompt(6, seed=5)
    free = tiny_greedy(arch, ids, 60)
    later, earlier = free[30], free[12]
    ids_eos = [later, earlier, 95]
    expected = tiny_greedy(arch, ids, 60, eos=ids_eos)
    out = jacobi_generate(model, ids, max_new_tokens=60, window_size=8, eos_token_id=ids_eos)
    assert out.tokens == expected
    assert out.tokens[-1] in ids_eos and not set(out.tokens[:-1]) & set(ids_eos)


def test_eos_as_first_token_stops_after_prefill(arch, model):
    ids = prompt(6, seed=6)
    first = tiny_greedy(arch, ids, 1)[0]
    out = jacobi_generate(model, ids, max_new_tokens=20, eos_token_id=first)
    assert out.tokens == [first] and out.finish_reason == "stop" and out.stats.forwards == 0


def test_stream_hands_out_tokens_as_they_become_final(arch, model):
    ids = prompt(10, seed=7)
    expected = tiny_greedy(arch, ids, 40)
    steps = list(jacobi_stream(model, ids, JacobiConfig(max_new_tokens=40, window_size=4)))
    assert steps[0].window == [] and len(steps[0].tokens) == 1       # the prefill's token
    assert [t for s in steps for t in s.tokens] == expected
    assert all(s.tokens for s in steps)                               # every forward adds one
    assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1)
    assert steps[-1].finish_reason == "length"
    for prev, s in zip(steps, steps[1:]):
        assert s.window[0] == (prev.tokens[-1])                       # the block opens with it
        made = s.window[1:s.accepted] + [s.predictions[s.accepted - 1]]
        assert s.tokens == made[: len(s.tokens)]


def test_input_forms_and_bad_input(arch, model):
    ids = prompt(5, seed=8)
    expected = tiny_greedy(arch, ids, 10)
    assert jacobi_generate(model, ids[0].tolist(), max_new_tokens=10).tokens == expected
    assert jacobi_generate(model, ids[0], max_new_tokens=10).tokens == expected
    with pytest.raises(ValueError):
        jacobi_generate(model, [], max_new_tokens=10)
    with pytest.raises(ValueError):
        jacobi_generate(model, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=10)
