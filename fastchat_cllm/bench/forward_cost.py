"""What one forward costs on a model shape with random weights: B rows x a window of n new tokens
over a prefilled cache, eager (the engine's dynamic cache, and a static one) and compiled; and
transformers' greedy generate against the engine at a window of 1 (the engine's own overhead).

What a CLLM's tokens per forward are worth follows: a window of n pays off once a forward makes
more than ms(B, n) / ms(B, 1) tokens final (`break_even`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..core import kv_cache
from ..loading import attention_implementation
from .methods import Target, decoder, timed_run

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=256),
}
WARMUP = 3         # calls before timing (CUDA graphs record on the second or third)
REPEATS = 10       # timed calls per cell; a cell is their median
DECODE_RUNS = 3    # timed decodes per method (after one warm-up)


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]   # B: rows per forward
    windows: tuple[int, ...]   # n: new tokens per row and forward
    context: int               # cached tokens per row before each forward (the prompt, for decodes)

    @property
    def cells(self) -> list[tuple[int, int]]:
        return [(b, n) for b in self.batches for n in self.windows]


def build_model(shape: str, dtype: torch.dtype, device: str):
    """A Llama of `shape` with random weights, made in place on `device` in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.set_attn_implementation(attention_implementation(device, dtype))
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], None], device: torch.device) -> float:
    """Median wall-clock milliseconds of `run` (device synchronised), after WARMUP calls."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _ids(model, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, length), device=model.device)


def _prefilled(model, grid: Grid, batch: int, static: bool):
    """A cache holding `grid.context` random tokens in each of `batch` rows."""
    cache = (kv_cache.new_static_cache(model, grid.context + max(grid.windows)) if static
             else kv_cache.new_cache(model))
    kv_cache.step_function(model, cache)(_ids(model, batch, grid.context))
    return cache


def _window_forward(step, cache, windows: torch.Tensor) -> Callable[[], None]:
    """One forward of `windows` [B, n] after the context; its keys/values dropped again after."""
    def run() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        step(windows)
        kv_cache.drop_last(cache, windows.shape[1])
    return run


@torch.inference_mode()
def eager_costs(model, grid: Grid, static: bool) -> dict[tuple[int, int], float]:
    """ms of one eager forward per (B, n): dynamic cache (the engine's) or static."""
    costs = {}
    for batch in grid.batches:
        cache = _prefilled(model, grid, batch, static)
        step = kv_cache.step_function(model, cache)
        for window in grid.windows:
            windows = _ids(model, batch, window)
            costs[batch, window] = median_ms(_window_forward(step, cache, windows),
                                             model.device)
    return costs


@torch.no_grad()   # not inference_mode: the mode transformers' own compiled generate runs in
def compiled_cost(model, grid: Grid, cell: tuple[int, int], options: dict) -> dict:
    """One cell compiled (static cache): {"ms", "compile_s"}; compile_s is the first call."""
    batch, window = cell
    torch._dynamo.reset()   # each cell its own capture: no recompile limit, no stale graphs
    cache = _prefilled(model, grid, batch, static=True)
    step = torch.compile(kv_cache.step_function(model, cache), fullgraph=True, dynamic=False,
                         **options)
    run = _window_forward(step, cache, _ids(model, batch, window))
    started = time.perf_counter()
    run()
    _sync(model.device)
    return {"compile_s": time.perf_counter() - started, "ms": median_ms(run, model.device)}


def compiled_costs(model, grid: Grid, options: dict, deadline: float) -> dict[tuple, dict]:
    """compiled_cost per cell, B=1 first, while the clock (time.monotonic) leaves room before
    `deadline` for one more compile as long as the longest so far; a failed one ends the run."""
    costs, longest = {}, 0.0
    for cell in grid.cells:
        if time.monotonic() + 1.5 * longest > deadline:
            break
        try:
            costs[cell] = compiled_cost(model, grid, cell, options)
        except Exception as error:   # recorded; the other steps still run
            costs[cell] = {"error": f"{type(error).__name__}: {error}"}
            break
        longest = max(longest, costs[cell]["compile_s"])
    torch._dynamo.reset()
    return costs


def decode_overhead(model, grid: Grid, new_tokens: int) -> dict:
    """transformers' greedy generate vs the engine at a window of 1, one row: tokens/s each."""
    prompt = _ids(model, 1, grid.context)[0].tolist()
    target = Target(prompt, new_tokens, eos_token_id=(), pad_token_id=0)
    methods = {}
    for name in ("ar", "jacobi-w1"):
        decode = decoder(name)
        timed_run(decode, model, target)
        runs = [timed_run(decode, model, target) for _ in range(DECODE_RUNS)]
        methods[name] = {"tokens": runs[0].tokens, "model_calls": runs[0].model_calls,
                         "tokens_per_second": statistics.median(
                             len(r.tokens) / r.seconds for r in runs)}
    ar, engine = methods["ar"], methods["jacobi-w1"]
    return {"new_tokens": new_tokens, "identical": ar.pop("tokens") == engine.pop("tokens"),
            "engine_vs_ar": engine["tokens_per_second"] / ar["tokens_per_second"], **methods}


def break_even(costs: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Tokens per forward a window of n must make final to beat n = 1: ms(B, n) / ms(B, 1)."""
    return {(b, n): ms / costs[b, 1] for (b, n), ms in costs.items() if (b, 1) in costs}
