"""Milliseconds per engine forward of one model on each of its CPU weight paths, side by side:

    python -m fastchat_cllm.bench.weights [--model PATH] [--shapes 1x1,1x4,1x16,8x1,8x4]
        [--paths quantized,quantized-compiled,float32,float32-compiled] [--context 200]

A shape RxN is R rows (requests) of N new tokens each over C cached tokens per row, run by the
engine's Runner as a served step is (its attention, its slot cache), logits for every new token.
Paths: `quantized` (a GGUF model's linear layers on the file's blocks, core/gguf_linear.py),
`float32` (dequantized at load, linear layers prepacked for oneDNN), each eager and compiled
(the worker's --compile). Also printed: the bytes of weights each path reads per forward and the
floor that sets at the machine's read bandwidth (measured here: a sum over a large array).
The paths run in turn, shape by shape, so a drifting machine hits them alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .. import loading
from ..core.engine.runner import Row, Runner
from ..core.engine.slot_cache import SlotCache
from ..core.gguf_linear import GGUFLinear
from ..core.packed_linear import PackedLinear, pack_for_inference

PATHS = ("quantized", "quantized-compiled", "float32", "float32-compiled")
REPEATS = 9


def read_bandwidth(megabytes: int = 512) -> float:
    """Bytes per second a sum over a large float32 array reads (the best of 5)."""
    data = torch.ones(megabytes * 2**20 // 4)
    best = min(timed(lambda: data.sum()) for _ in range(5))
    return data.numel() * 4 / best


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(model) -> int:
    """Bytes of weights one forward reads in its linear layers (the norms' few KB and the
    embedding, one row a token, left out)."""
    total = 0
    for module in model.modules():
        if isinstance(module, GGUFLinear):
            total += module.nbytes
        elif isinstance(module, (torch.nn.Linear, PackedLinear)):
            total += module.in_features * module.out_features * 4
    return total


def runner_for(path: str, model_path: str | None, rows: int, max_len: int):
    model, _ = loading.load(model_path, dtype=torch.float32,
                            quantized=path.startswith("quantized"))
    compiled = path.endswith("compiled")
    if not compiled:
        pack_for_inference(model)
    cache = SlotCache(model, rows, max_len)
    return model, Runner(model, cache, compile=compiled)


def shape_ms(runner: Runner, rows: int, width: int, context: int) -> float:
    """Median ms of REPEATS forwards of rows x width after `context` cached tokens a row."""
    for slot in range(rows):
        runner.cache.clear(slot)
        runner.run([Row(slot, [1 + (slot + i) % 100 for i in range(context)], range(0))])
    times = []
    for _ in range(REPEATS + 1):
        batch = [Row(slot, [7 + i for i in range(width)], range(width)) for slot in range(rows)]
        times.append(runner.run(batch).seconds)
        for slot in range(rows):
            runner.cache.trim(slot, width)
    return statistics.median(times[1:]) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GGUF model (default: the default model)")
    p.add_argument("--shapes", default="1x1,1x4,1x16,8x1,8x4")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="results JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    paths = args.paths.split(",")
    rows = max(r for r, _ in shapes)
    max_len = args.context + max(n for _, n in shapes) + 1
    runners, results = {}, {"threads": torch.get_num_threads(), "shapes": {}, "paths": {}}
    for path in paths:
        started = time.perf_counter()
        model, runner = runner_for(path, args.model, rows, max_len)
        runners[path] = runner
        results["paths"][path] = {"weight_mb": weight_bytes(model) / 1e6,
                                  "ready_s": time.perf_counter() - started}
    bandwidth = read_bandwidth()
    results["read_gb_s"] = bandwidth / 1e9
    with torch.inference_mode():
        for rows_, width in shapes:
            cell = results["shapes"][f"{rows_}x{width}"] = {}
            for path in paths:
                cell[path] = shape_ms(runners[path], rows_, width, args.context)
    print(f"threads {results['threads']}, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| rows x new tokens | " + " | ".join(f"{p} (ms)" for p in paths) + " |")
    print("|---" * (len(paths) + 1) + "|")
    for shape, cell in results["shapes"].items():
        print(f"| {shape} | " + " | ".join(f"{cell[p]:.1f}" for p in paths) + " |")
    print("| weights read (MB) | " + " | ".join(
        f"{results['paths'][p]['weight_mb']:.0f}" for p in paths) + " |")
    print("| read floor (ms) | " + " | ".join(
        f"{results['paths'][p]['weight_mb'] * 1e6 / bandwidth * 1e3:.1f}" for p in paths) + " |")
    print("| load + compile (s) | " + " | ".join(
        f"{results['paths'][p]['ready_s']:.0f}" for p in paths) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
