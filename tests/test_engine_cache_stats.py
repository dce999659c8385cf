"""The KV cache is kept across iterations, statistics are exact, the block size adapts."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

from harness import ar_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate, jacobi_stream
from fastchat_cllm.core.window_size import WindowSizer
from fastchat_cllm.core.jacobi import carried_ages
from fastchat_cllm.core.verify import accepted_length

CORE = pathlib.Path(__file__).resolve().parents[1] / "fastchat_cllm" / "core"


def record_forwards(model):
    """Input lengths and cache lengths of every model call, via a forward pre-hook."""
    calls = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((kwargs["input_ids"].shape[1], cache.get_seq_length()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fixed", [False, True])
def test_prompt_runs_once_then_only_blocks_over_the_cache(fixed):
    model = tiny_model("qwen2")
    ids = torch.arange(3, 43).reshape(1, -1)
    calls, handle = record_forwards(model)
    try:
        out = jacobi_generate(model, ids, max_new_tokens=50, window_size=8, adaptive=False,
                              fixed_blocks=fixed)
    finally:
        handle.remove()
    assert calls[0] == (40, 0)                       # prefill: the prompt, empty cache
    assert len(calls) == out.stats.forwards + 1
    final = 0
    for (window, cached), k, size in zip(calls[1:], out.stats.accepted_per_forward,
                                         out.stats.window_sizes):
        assert window == size <= 8
        assert cached == 40 + final                  # exactly prompt + final tokens, no rejects
        final += k
    assert out.tokens == ar_greedy(model, ids, 50)


def test_statistics_are_consistent_and_exact():
    model = tiny_model("llama")
    ids = torch.arange(5, 20).reshape(1, -1)
    steps = list(jacobi_stream(model, ids, max_new_tokens=64, window_size=16, adaptive=False,
                               fixed_blocks=True))
    s, tokens = steps[-1].stats, [t for step in steps for t in step.tokens]
    assert s.forwards == len(s.accepted_per_forward) == len(s.window_sizes) == len(steps) - 1
    assert s.tokens == len(tokens) == 64
    assert 1 + sum(s.accepted_per_forward) >= s.tokens            # the last forward may be cut
    assert s.accepted_per_forward == [step.accepted for step in steps[1:]]
    assert s.fast_forwarded == sum(k - 1 for k in s.accepted_per_forward)
    assert s.tokens_per_forward == pytest.approx(sum(s.accepted_per_forward) / s.forwards)
    assert 0 <= s.stationary <= s.fast_forwarded
    # A fixed block runs until its fixed point: forwards between block starts, and each
    # block's forwards accept exactly its size (16, the last one what the budget leaves).
    starts = [i for i, step in enumerate(steps[1:]) if step.block_start] + [s.forwards]
    assert s.iterations_per_block == [b - a for a, b in zip(starts, starts[1:])]
    for a, b in zip(starts, starts[1:]):
        assert sum(s.accepted_per_forward[a:b]) == s.window_sizes[a]
        assert s.window_sizes[a] == 16 or b == s.forwards


def test_block_size_one_is_autoregressive():
    model = tiny_model("mistral")
    out = jacobi_generate(model, [4, 5, 6], max_new_tokens=20, window_size=1)
    assert out.stats.forwards == 19 and out.stats.tokens_per_forward == 1.0
    assert out.stats.fast_forwarded == 0 and out.stats.window_sizes == [1] * 19


def test_accepted_length_and_stationary_ages():
    #        window:  y0  g1  g2  g3  g4
    window = [7, 1, 2, 9, 4]
    preds = [1, 2, 3, 4, 5]      # g1, g2 right; g3 wrong -> k = 3, next token = 3
    assert accepted_length(window, preds) == 3
    ages = [0, 0, 2, 0, 1]
    # carried: preds[3]=4 lands where g4=4 was (kept: age 1+1); preds[4]=5 is new (age 0)
    assert carried_ages(window, ages, preds, 3) == [2, 0]
    assert accepted_length([7], [1]) == 1


def test_controller_grows_on_acceptance_and_shrinks_without():
    sizer = WindowSizer(1, 16, adaptive=True, cost=None, device_type="cpu")
    for _ in range(30):
        n = sizer.next_size(1000)
        sizer.observe(n, n, seconds=0.05 + 0.003 * n)   # every guess right
    assert sizer.next_size(1000) >= 12
    assert sizer.next_size(5) == 5                       # never more than the tokens left
    for _ in range(30):
        n = sizer.next_size(1000)
        sizer.observe(n, 1, seconds=0.05 if n == 1 else 0.08 + 0.003 * n)  # no guess right
    assert sizer.next_size(1000) == 1
    fixed = WindowSizer(1, 16, adaptive=False, cost=None, device_type="cpu")
    assert fixed.next_size(1000) == 16


def test_config_rejects_bad_values():
    for bad in (dict(window_size=0), dict(window_size=5000), dict(max_new_tokens=0),
                dict(min_window_size=20, window_size=8), dict(fill="oracle"),
                dict(window_cost=-1.0), dict(window_size="16")):
        with pytest.raises(ValueError):
            JacobiConfig(**bad)
    assert JacobiConfig(eos_token_id=2).eos_token_id == (2,)


NO_FASTCHAT = """
import sys
sys.modules["fastchat"] = None          # as if FastChat were not installed
import torch
import fastchat_cllm
from fastchat_cllm.core import JacobiConfig
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
out = fastchat_cllm.jacobi_generate(model, [1, 5, 9, 14], max_new_tokens=12, window_size=4)
ref = model.generate(torch.tensor([[1, 5, 9, 14]]), max_new_tokens=12, do_sample=False)
assert out.tokens == ref[0, 4:].tolist(), (out.tokens, ref)
assert not any(m.startswith("fastchat.") for m in sys.modules), "FastChat got imported"
print("ok", len(out.tokens))
"""


def test_core_imports_no_fastchat():
    """No module of the core names FastChat or the web stack, and the engine runs (and equals
    generate) in a fresh interpreter where FastChat cannot be imported."""
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            banned = [n for n in names if n.split(".")[0] in ("fastchat", "gradio", "fastapi")]
            assert not banned, path
    done = subprocess.run([sys.executable, "-c", NO_FASTCHAT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "12"]
