"""`bench --compare-llamacpp`'s own logic against real OpenAI-compatible streaming servers on
127.0.0.1 (test_bench_serving's tiny server stands in for both sides): every wave runs on every
side with the same prompts, the order rotating; rates and ratios per level; the table; and the
refusals that come before any server starts."""
from __future__ import annotations

import asyncio
import stat
import threading

import pytest

from harness import char_tokenizer
from test_bench_serving import TinyChatServer
from fastchat_cllm.bench.llamacpp import LlamaCompareConfig, measure, table
from fastchat_cllm.bench.prompts import builtin_prompts


@pytest.fixture
def two_servers():
    servers = [TinyChatServer(send_usage=False) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def binary(tmp_path):
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_every_wave_runs_on_every_side_with_the_same_prompts(two_servers, binary):
    ours, theirs = two_servers
    config = LlamaCompareConfig(binary=binary, concurrency=(1, 2), max_new_tokens=8)
    prompts = builtin_prompts()[:3]
    sides = {"fastchat-cllm": (ours.url, "tiny"), "llama-server": (theirs.url, "tiny")}
    results = asyncio.run(measure(sides, config, prompts, char_tokenizer()))
    assert sorted(ours.asked) == sorted(theirs.asked) and len(ours.asked) == 3 + 3  # waves 2 + 1
    assert len(set(ours.asked)) == 6                     # each request its own ("Request N:")
    for side in sides:
        levels = results[side]
        assert [level["concurrency"] for level in levels] == [1, 2]
        assert [level["requests"] for level in levels] == [3, 3]
        assert all(level["failed"] == 0 and level["token_source"] == ["tokenizer"]
                   for level in levels)
        assert sum(level["tokens"] for level in levels) > 0
    result = {"sides": results, "ours_over": {"llama-server": [1.0, 2.0]}}
    text = table(result)
    assert "| 1 |" in text and "| 2 |" in text and "ours / llama-server" in text


def test_refused_before_anything_starts(binary, tmp_path):
    with pytest.raises(ValueError, match="not an executable file"):
        LlamaCompareConfig(binary=str(tmp_path / "missing"))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="needs a GGUF model"):
        LlamaCompareConfig(binary=binary, model=str(folder))
    with pytest.raises(ValueError, match=">= 1"):
        LlamaCompareConfig(binary=binary, concurrency=(0,))
