"""The n-gram pool: bounded, proposes what it was fed, and keeps decoding exact."""
from __future__ import annotations

import pytest
import torch

from harness import ARCHITECTURES, tiny_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.core.guesses import Context, window_guesses
from fastchat_cllm.core.ngram_pool import NGramPool


def test_pool_proposes_recent_continuations_and_chains():
    pool = NGramPool(n=3, max_keys=16)
    pool.add([1, 2, 3, 9, 2, 4, 5])          # 3-grams: (1,2,3) (2,3,9) (3,9,2) (9,2,4) (2,4,5)
    assert pool.propose(2, 2) == [4, 5]      # the most recent continuation of 2
    assert pool.propose(1, 6) == [2, 3, 9, 2, 4, 5]   # 1 -> 2 3, then 3 -> 9 2, then 2 -> 4 5
    assert pool.propose(7, 3) == []


def test_pool_never_grows_past_its_bound():
    pool = NGramPool(n=4, max_keys=8, per_key=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pool.add(torch.randint(0, 40, (30,), generator=gen).tolist())
        assert len(pool.pool) <= 8 and len(pool) <= 16
        assert all(len(c) <= 2 for c in pool.pool.values())
    with pytest.raises(ValueError):
        NGramPool(n=1, max_keys=8)
    with pytest.raises(ValueError):
        JacobiConfig(ngram_pool=-1)


def test_block_guesses_prefer_a_longer_pool_proposal():
    context = Context([5, 6, 7, 8, 5, 6], seed=0, pool=NGramPool(n=3, max_keys=64))
    assert window_guesses("lookup", context, 6, [1], 3) == [7, 8, 5]
    plain = Context([5, 6, 7, 8, 5, 6], seed=0)
    assert window_guesses("lookup", plain, 6, [5], 3) == [5, 6, 7]   # carried, then bigrams
    assert window_guesses("lookup", plain, 6, [1], 3) == [1, 1, 1]   # unknown: repeat


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("window_size", [2, 16])
@pytest.mark.parametrize("pool", [(2, 4), (6, 1024)])
def test_pool_keeps_output_exact(arch, window_size, pool):
    model = tiny_model(arch)
    ids = torch.arange(3, 30).reshape(1, -1) % 11 + 3    # a repetitive prompt
    expected = tiny_greedy(arch, ids, 48)
    size, keys = pool
    for adaptive in (False, True):
        out = jacobi_generate(model, ids, max_new_tokens=48, window_size=window_size,
                              adaptive=adaptive, ngram_pool=keys, ngram_size=size)
        assert out.tokens == expected


def test_worker_flags_turn_the_pool_on_and_refuse_bad_sizes(capsys):
    from fastchat_cllm.serving.options import jacobi_config
    from fastchat_cllm.serving.worker import build_parser

    parser = build_parser()
    config = jacobi_config(parser, parser.parse_args(["--ngram-pool", "256", "--ngram-size", "3"]))
    assert (config.ngram_pool, config.ngram_size) == (256, 3)
    assert jacobi_config(parser, parser.parse_args([])).ngram_pool == 0
    with pytest.raises(SystemExit):
        jacobi_config(parser, parser.parse_args(["--ngram-pool", "-1"]))
    assert "ngram_pool must be in" in capsys.readouterr().err
