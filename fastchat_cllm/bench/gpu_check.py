"""One prepared GPU check, everything written under --out: (1) the CUDA tests; (2) the cost of one
forward for B rows x a window of n on a Llama-2-7B-shaped model with random weights, eager and
compiled, and generate against the engine at a window of 1; (3) the shipped CLLM, once there is one.

python -m fastchat_cllm.bench.gpu_check [--device cuda|cpu] [--shape llama2-7b|tiny] [--out DIR]

Without CUDA it refuses (exit 2); `--device cpu` is a dry run of every step (tiny shape unless
--shape says otherwise). Exit 1 when a step failed. docs/gpu.md says how to run it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import loading
from . import report
from .offline import OfflineConfig, run_offline
from .prompts import builtin_prompts
from .forward_cost import (SHAPES, Grid, break_even, build_model, compiled_costs,
                           decode_overhead, eager_costs)

CUDA_TESTS = Path(__file__).resolve().parents[2] / "tests" / "test_engine_cuda.py"
COMPILE = {   # torch.compile options by device, and what they measure
    "cuda": ({"mode": "reduce-overhead"}, "inductor + CUDA graphs (mode=reduce-overhead)"),
    "cpu": ({"backend": "eager"}, "dynamo capture only (backend=eager): a dry run, not compiled"),
}
REFUSAL = ("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU "
           "machine, or dry-run with --device cpu")
TESTS_TIMEOUT_S = 240
MARGIN_S = 20      # left after the last compile, for step 3 and the files
FAILED = ("error", "failed", "partial")   # step statuses that make the exit status 1
COST_HEADER = ["B", "n", "eager ms (dynamic cache)", "eager ms (static cache)", "compiled ms",
               "compile s", "break-even tokens/forward"]


@dataclass(frozen=True)
class CheckConfig:
    device: str
    shape: str
    dtype: str
    grid: Grid
    new_tokens: int    # decoded per method in the generate-vs-engine comparison
    budget_s: float    # the whole check; compiled cells fill what the other steps leave
    out: Path


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def cuda_tests(config: CheckConfig) -> dict:
    """Step 1: pytest on the CUDA-marked tests in a child process; its JUnit XML kept in --out."""
    xml = config.out / "cuda_tests.xml"
    xml.unlink(missing_ok=True)              # never report an earlier run's results
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", f"--junitxml={xml}", str(CUDA_TESTS)],
                          capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no results (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    root = ElementTree.parse(xml).getroot()
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    count = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    status = ("failed" if failed or done.returncode not in (0, 5) else
              "passed" if passed else "skipped")
    return {"status": status, "passed": passed, "failed": failed, "skipped": count["skipped"],
            "returncode": done.returncode, "output_tail": done.stdout[-2000:]}


def forward_cost(config: CheckConfig, deadline: float) -> dict:
    """Step 2: the forward-cost table and generate vs the engine at a window of 1."""
    model = build_model(config.shape, getattr(torch, config.dtype), config.device)
    log(f"{config.shape}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{model.dtype} on {model.device}")
    eager = eager_costs(model, config.grid, static=False)
    decode = decode_overhead(model, config.grid, config.new_tokens)
    static, compiled, static_error = _static_and_compiled(model, config, deadline)
    even = break_even(eager)
    cells = [{"batch": b, "window": n, "eager_ms": eager[b, n], "static_ms": static.get((b, n)),
              "break_even": even.get((b, n)),
              **{f"compiled_{key}": value for key, value in compiled.get((b, n), {}).items()}}
             for b, n in config.grid.cells]
    broken = static_error or any("compiled_error" in cell for cell in cells)
    return {"status": "partial" if broken else "done",
            "model": {"shape": config.shape, "dtype": config.dtype, **SHAPES[config.shape]},
            "context": config.grid.context, "compile": COMPILE[config.device][1],
            "static_error": static_error, "cells": cells, "decode_at_window_1": decode}


def _static_and_compiled(model, config: CheckConfig,
                         deadline: float) -> tuple[dict, dict, str | None]:
    """Eager costs with a static cache, then compiled: (static, compiled, why static failed)."""
    try:
        static = eager_costs(model, config.grid, static=True)
    except Exception as error:   # e.g. transformers 5.17, whose static cache cannot crop
        return {}, {}, f"{type(error).__name__}: {error}"
    options = COMPILE[config.device][0]
    return static, compiled_costs(model, config.grid, options, deadline - MARGIN_S), None


def shipped_cllm(config: CheckConfig) -> dict:
    """Step 3: the shipped CLLM's tokens per forward and speed vs generate on the built-in
    HumanEval prompts (skipped in a CPU dry run, and while no adapter is shipped)."""
    folder = loading.PACKAGED / loading.CLLM_MODEL
    if not (folder / loading.ADAPTER_WEIGHTS).exists():
        return {"status": "skipped",
                "reason": f"no shipped CLLM ({loading.CLLM_MODEL}: no {loading.ADAPTER_WEIGHTS})"}
    if config.device == "cpu":
        return {"status": "skipped", "reason": f"a dry run: {loading.CLLM_MODEL} is measured on "
                "the GPU (on a CPU: python -m fastchat_cllm.train.evaluate_code)"}
    return measure_shipped(config.device, config.dtype, config.new_tokens)


def measure_shipped(device: str, dtype: str, new_tokens: int) -> dict:
    """The CLLM alias under `ar`, `jacobi`, `jacobi-w16` and `pld` on the built-in HumanEval
    prompts (interleaved, one pass)."""
    model, tokenizer = loading.load(loading.CLLM_MODEL, dtype=getattr(torch, dtype), device=device)
    prompts = [p for p in builtin_prompts() if p.category == "code"]
    results = run_offline(OfflineConfig(("ar", "jacobi", "jacobi-w16", "pld"), new_tokens, 1),
                          model, tokenizer, prompts)
    return {"status": "done", "methods": results["methods"],
            "reason": f"{len(prompts)} HumanEval prompts, {new_tokens} new tokens\n\n"
                      + report.offline_table(results["methods"])}


def run_step(name: str, step: Callable[[], dict]) -> dict:
    """Run one step; an exception is recorded as its result and the next step still runs."""
    log(f"{name} ...")
    started = time.perf_counter()
    try:
        result = step()
    except Exception as error:   # recorded; the other steps still run
        result = {"status": "error", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - started
    log(f"{name}: {result['status']} ({result['seconds']:.1f} s)")
    return result


def _tests_section(tests: dict) -> list[str]:
    if tests["status"] == "error":
        return [f"error: {tests['error']}"]
    failed = ", ".join(tests["failed"]) or "none"
    return [f"{tests['status']}: {tests['passed']} passed, {tests['skipped']} skipped, "
            f"failed: {failed} ({tests['seconds']:.0f} s)"]


def _cost_section(cost: dict) -> list[str]:
    if cost["status"] == "error":
        return [f"error: {cost['error']}"]
    model, decode = cost["model"], cost["decode_at_window_1"]
    rows = [[c["batch"], c["window"], c["eager_ms"], c["static_ms"],
             "error" if "compiled_error" in c else c.get("compiled_ms"),
             c.get("compiled_compile_s"), c["break_even"]] for c in cost["cells"]]
    errors = [f"static cache: {cost['static_error']}"] if cost["static_error"] else []
    errors += [f"compile: {c['compiled_error']}" for c in cost["cells"] if "compiled_error" in c]
    methods = [[name, decode[name]["tokens_per_second"], decode[name]["model_calls"]]
               for name in ("ar", "jacobi-w1")]
    return [
        f"{model['shape']} ({model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['dtype']}, random weights): median ms of one forward of B rows x n new tokens "
        f"over {cost['context']} cached tokens a row. Compiled: {cost['compile']}. Break-even: "
        "the tokens per forward a window of n must make final to beat n = 1 (eager ms ratio).",
        "", report.markdown_table(COST_HEADER, rows), *errors, "",
        f"transformers generate vs the engine at window 1 (B = 1, {decode['new_tokens']} new "
        f"tokens): engine/AR speed {decode['engine_vs_ar']:.3f}, same tokens: "
        f"{'yes' if decode['identical'] else 'no'}",
        "", report.markdown_table(["method", "tokens/s", "model calls"], methods)]


def summary(run: dict) -> str:
    steps, config = run["steps"], run["config"]
    shipped = steps["shipped_cllm"]
    return "\n".join([
        f"# GPU check: --device {config['device']} --shape {config['shape']}", "",
        f"machine: {report.machine_line(run['machine'])}, CUDA {run['machine']['cuda']}; "
        f"{run['seconds']:.0f} s in all", "",
        "## 1. CUDA tests", "", *_tests_section(steps["cuda_tests"]), "",
        "## 2. Forward cost", "", *_cost_section(steps["forward_cost"]), "",
        "## 3. Shipped CLLM", "",
        f"{shipped['status']}: {shipped.get('reason', shipped.get('error'))}",
        ""])


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", choices=tuple(SHAPES), help="llama2-7b on cuda, tiny on cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--batch", type=_ints, default=(1, 8, 32), help="B values, e.g. 1,8,32")
    p.add_argument("--window", type=_ints, default=(1, 4, 16, 32, 64), help="n values")
    p.add_argument("--context", type=int, default=512, help="cached tokens a row")
    p.add_argument("--new-tokens", type=int, default=128, help="generate vs engine: tokens")
    p.add_argument("--budget-s", type=float, default=420, help="the whole check, seconds")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    return p


def main(argv: list[str] | None = None) -> int:
    options = parser()
    args = options.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    if 1 not in args.window:
        options.error("--window must include 1 (the break-even reference)")
    shape = args.shape or ("llama2-7b" if args.device == "cuda" else "tiny")
    grid = Grid(args.batch, args.window, args.context)
    config = CheckConfig(args.device, shape, args.dtype, grid, args.new_tokens, args.budget_s,
                         args.out)
    if config.device == "cpu":
        torch.set_num_threads(1)   # a dry run: on a shared CPU, more threads stall each other
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps = {"cuda_tests": run_step("step 1: CUDA tests", lambda: cuda_tests(config)),
             "forward_cost": run_step("step 2: forward cost", lambda: forward_cost(
                 config, started + config.budget_s)),
             "shipped_cllm": run_step("step 3: shipped CLLM", lambda: shipped_cllm(config))}
    run = {"command": ["python", "-m", __spec__.name, *sys.argv[1:]],
           "config": {**asdict(config), "out": str(config.out)},
           "machine": {**report.machine(), "cuda": torch.version.cuda}, "steps": steps,
           "seconds": time.monotonic() - started}
    report.write_json(run, config.out / "gpu_check.json")
    text = summary(run)
    (config.out / "summary.md").write_text(text)
    print(text)
    return 1 if any(step["status"] in FAILED for step in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
