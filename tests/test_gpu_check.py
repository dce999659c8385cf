"""The GPU check's CPU side: `bash run.sh gpu-check` refuses in one line without CUDA, and its dry
run (--device cpu) runs every step and writes the JSON and the summary."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from harness import save_adapter, tiny_folder, tiny_model
from fastchat_cllm.bench.gpu_check import REFUSAL
from fastchat_cllm.core import kv_cache

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch", "1,2", "--window", "1,4", "--context", "32", "--new-tokens", "8"]


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "run.sh", "gpu-check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env)


def test_gpu_check_without_cuda_refuses_in_one_line():
    """Runs on a GPU machine too: the GPU is hidden from the check."""
    done = gpu_check(env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [REFUSAL] and done.stdout == ""


def test_gpu_check_dry_run_on_cpu_runs_every_step(tmp_path):
    done = gpu_check("--device", "cpu", *SMALL, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "gpu_check.json").read_text())
    tests, cost, shipped = (run["steps"][k] for k in ("cuda_tests", "forward_cost", "shipped_cllm"))
    assert tests["status"] == ("passed" if torch.cuda.is_available() else "skipped")
    assert tests["skipped"] + tests["passed"] > 0 and tests["failed"] == []
    assert (tmp_path / "cuda_tests.xml").exists()

    assert cost["status"] == "done" and cost["model"]["shape"] == "tiny"
    assert [(c["batch"], c["window"]) for c in cost["cells"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all(c["eager_ms"] > 0 and c["static_ms"] > 0 for c in cost["cells"])
    assert cost["cells"][0]["compiled_ms"] > 0 and cost["cells"][0]["break_even"] == 1
    decode = cost["decode_at_window_1"]
    assert decode["identical"] and decode["ar"]["model_calls"] == decode["jacobi-w1"]["model_calls"] == 8

    assert shipped["status"] == "skipped" and "smollm2-135m-cllm" in shipped["reason"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary in done.stdout and "| B | n | eager ms (dynamic cache)" in summary
    for heading in ("## 1. CUDA tests", "## 2. Forward cost", "## 3. Shipped CLLM"):
        assert heading in summary


def test_the_shipped_cllm_step_measures_the_alias(tmp_path, monkeypatch, one_thread):
    """Step 3's measurement, on CPU with a throwaway adapter as the alias."""
    from fastchat_cllm import loading
    from fastchat_cllm.bench.gpu_check import measure_shipped
    from fastchat_cllm.train.ship import ship

    base = tiny_folder(tmp_path / "base")
    monkeypatch.setattr(loading, "PACKAGED", tmp_path / "models")
    ship(save_adapter(tmp_path / "adapter", str(base)), loading.CLLM_MODEL, str(base))
    shipped = measure_shipped("cpu", "float32", 8)
    assert shipped["status"] == "done" and "| jacobi-w16 |" in shipped["reason"]
    methods = shipped["methods"]
    assert set(methods) == {"ar", "jacobi", "jacobi-w16", "pld"}
    assert all(m["identical_to_ar"] == m["runs"] == 4 for m in methods.values())


@torch.inference_mode()
def test_a_static_cache_step_computes_what_the_engines_cache_does():
    """The static-cache (and compiled) cells time the engine's forward: same logits, and drop_last
    moves a static cache's length back as it crops a dynamic one."""
    model = tiny_model("llama")
    context, block = torch.randint(3, 96, (2, 20)), torch.randint(3, 96, (2, 5))
    logits = []
    for cache in (kv_cache.new_cache(model), kv_cache.new_static_cache(model, 32)):
        step = kv_cache.step_function(model, cache)
        step(context)
        step(block)
        kv_cache.drop_last(cache, 5)
        assert kv_cache.cached_length(cache) == 20
        logits.append(step(block))
    torch.testing.assert_close(logits[0], logits[1])
