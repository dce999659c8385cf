"""`--compare-llamacpp PATH`: our stack against llama.cpp's `llama-server` (the binary at PATH)
on the same GGUF file, both up at once and measured in turns.

llama-server gets the file our worker loads (the default model's, or --model's base when that
is a LoRA folder on a GGUF), the same thread count (-t, and OMP_NUM_THREADS for our worker:
torch's, or --threads) and slots (-np: the worker's
--limit-worker-concurrency), each slot the worker's context; with --llamacpp-spec a second
llama-server also runs with its n-gram speculation (ngram-simple, n 3, m 16), and with
--with-dequantized a second stack of ours on float32 weights (the worker's --dequantize: how we
ran before the file's blocks were kept). At each
concurrency c the prompts go in waves of c streams; each wave runs on every server in turn,
the order rotating wave by wave (A B C, B C A, ...), so a drifting machine hits them alike. A
side's rate at a level is its completion tokens over the sum of its waves' walls; tokens are
counted with the model's tokenizer on every side (no server's own usage). Greedy, the same
prompt text per wave on every side ("Request N: " numbering, as the serving mode).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .. import loading
from .prompts import Prompt
from .serving import ServingConfig, StreamError, level_summary, stream_once

SPEC_FLAGS = ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
              "--spec-ngram-simple-size-m", "16")
READY_TIMEOUT = 300         # seconds for llama-server to load the file and answer /health


@dataclass(frozen=True)
class LlamaCompareConfig:
    binary: str
    model: str | None = None             # our --model-path; llama-server gets its GGUF file
    concurrency: tuple[int, ...] = (1, 8)
    max_new_tokens: int = 128
    slots: int = 8
    threads: int = 0                     # 0: torch's thread count
    spec: bool = False                   # also llama-server with n-gram speculation
    dequantized: bool = False            # also our stack with --dequantize (the float32 path)
    timeout: float = 600.0
    logdir: str = "/tmp/fastchat-cllm-llamacpp-logs"
    worker_flags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            raise ValueError(f"--compare-llamacpp: {self.binary} is not an executable file "
                             f"(build llama-server: docs/llamacpp.md)")
        if self.slots < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("slots and concurrency levels must be >= 1")
        gguf_file(self.model)          # a model llama-server cannot load: refused before any start


def gguf_file(model: str | None) -> Path:
    """The GGUF file our worker loads for `model` (a LoRA folder: its base's)."""
    source = loading.resolve(model)
    if source.lora_config is not None:
        source = loading.lora_base(source)
    if not source.gguf_file:
        raise ValueError(f"--compare-llamacpp needs a GGUF model (or a LoRA on one); "
                         f"{model} is not")
    return source.folder / source.gguf_file


def threads(config: LlamaCompareConfig) -> int:
    import torch

    return config.threads or torch.get_num_threads()


@contextmanager
def llama_server(config: LlamaCompareConfig, port: int, name: str, extra: tuple[str, ...]):
    """A running llama-server on 127.0.0.1:port (its /health answering 200); stopped after."""
    log = Path(config.logdir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    context = config.slots * 2048
    command = [config.binary, "-m", str(gguf_file(config.model)), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads(config)), "-np", str(config.slots),
               "-c", str(context), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"llama-server exited ({process.returncode}):\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server not ready in {READY_TIMEOUT} s (log: {log})")


@contextmanager
def our_stack(config: LlamaCompareConfig, side: str = "fastchat-cllm", extra: tuple = ()):
    """Our stack on free ports with the same slots; yields its /v1 URL and served name."""
    from ..serving.stack import Stack, free_ports, parse

    controller, worker, api = free_ports(3)
    name = loading.model_name(config.model)
    args, worker_args = parse(["--model-path", config.model or loading.DEFAULT_MODEL,
                               "--controller-port", str(controller), "--worker-port",
                               str(worker), "--api-port", str(api), "--logdir",
                               str(Path(config.logdir) / side), "--model-names", name,
                               "--limit-worker-concurrency", str(config.slots),
                               *config.worker_flags, *extra])
    stack = Stack(args, worker_args)
    threads_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads(config))      # the worker's torch threads
    try:
        with redirect_stdout(sys.stderr):
            stack.up()
        yield stack.api, name
    finally:
        with redirect_stdout(sys.stderr):
            stack.down()
        if threads_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads_before


async def wave(client, serving: ServingConfig, model: str, prompts: list[Prompt],
               numbers: list[int], tokenizer) -> tuple[list, float, list[str]]:
    """One wave: a stream per prompt, all at once; (timings, wall seconds, errors)."""
    from httpx import HTTPError
    from openai import APIError

    errors: list[str] = []

    async def one(prompt, number):
        try:
            return await stream_once(client, serving, model, prompt, tokenizer, number)
        except (APIError, HTTPError, StreamError) as err:
            errors.append(f"{type(err).__name__}: {err}")
            return None

    started = time.perf_counter()
    timings = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, numbers)))
    return [t for t in timings if t is not None], time.perf_counter() - started, errors


async def measure(sides: dict[str, tuple[str, str]], config: LlamaCompareConfig,
                  prompts: list[Prompt], tokenizer) -> dict:
    """{side: [level summaries]}: every wave on every side in turn, the order rotating."""
    from openai import AsyncOpenAI

    clients = {side: AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=config.timeout,
                                 max_retries=0) for side, (url, _) in sides.items()}
    try:
        return await measure_with(clients, sides, config, prompts, tokenizer)
    finally:
        for client in clients.values():
            await client.close()


async def measure_with(clients: dict, sides: dict, config: LlamaCompareConfig,
                       prompts: list[Prompt], tokenizer) -> dict:
    names = list(sides)
    results = {side: [] for side in names}
    number = 0
    for c in config.concurrency:
        serving = ServingConfig("http://x/v1", None, (c,), config.max_new_tokens,
                                timeout=config.timeout, usage=False)
        totals = {side: ([], 0.0, []) for side in names}
        waves = [prompts[i: i + c] for i in range(0, len(prompts), c)]
        for w, batch in enumerate(waves):
            numbers = list(range(number, number + len(batch)))
            number += len(batch)
            order = names[w % len(names):] + names[: w % len(names)]
            for side in order:
                timings, wall, errors = await wave(clients[side], serving, sides[side][1],
                                                   batch, numbers, tokenizer)
                done, walls, errs = totals[side]
                totals[side] = (done + timings, walls + wall, errs + errors)
            print(f"  concurrency {c}: wave {w + 1}/{len(waves)} done", file=sys.stderr)
        for side in names:
            done, walls, errs = totals[side]
            results[side].append(level_summary(c, done, walls, errs))
    return results


def run_llamacpp_compare(config: LlamaCompareConfig, prompts: list[Prompt]) -> dict:
    """Start every side, measure, stop; {"sides": {side: levels}, "ratios": ...}."""
    from ..serving.stack import free_ports

    tokenizer = loading.load_tokenizer(loading.resolve(config.model))
    with ExitStack() as stack:      # each port chosen once the servers before it listen
        sides = {"fastchat-cllm": stack.enter_context(our_stack(config))}
        if config.dequantized:
            sides["fastchat-cllm-dequantized"] = stack.enter_context(
                our_stack(config, "fastchat-cllm-dequantized", ("--dequantize",)))
        url = stack.enter_context(llama_server(config, free_ports(1)[0], "llama-server", ()))
        sides["llama-server"] = (url, "llama")
        if config.spec:
            url = stack.enter_context(llama_server(config, free_ports(1)[0],
                                                   "llama-server-ngram", SPEC_FLAGS))
            sides["llama-server-ngram"] = (url, "llama")
        results = asyncio.run(measure(sides, config, prompts, tokenizer))
    ours = results["fastchat-cllm"]
    ratios = {side: [round(a["aggregate_tokens_per_second"] /
                           b["aggregate_tokens_per_second"], 3)
                     if b["aggregate_tokens_per_second"] else None
                     for a, b in zip(ours, levels)]
              for side, levels in results.items() if side != "fastchat-cllm"}
    return {"gguf": str(gguf_file(config.model)), "threads": threads(config),
            "binary": config.binary, "sides": results, "ours_over": ratios}


def table(result: dict) -> str:
    """Markdown: aggregate tokens/s per side and level, and ours over each other side."""
    sides = list(result["sides"])
    levels = [level["concurrency"] for level in result["sides"][sides[0]]]
    head = "| concurrency | " + " | ".join(f"{s} (tokens/s)" for s in sides) + " | " + \
        " | ".join(f"ours / {s}" for s in result["ours_over"]) + " |"
    lines = [head, "|---" * (len(sides) + len(result["ours_over"]) + 1) + "|"]
    for i, c in enumerate(levels):
        rates = [result["sides"][s][i]["aggregate_tokens_per_second"] for s in sides]
        ratios = [result["ours_over"][s][i] for s in result["ours_over"]]
        lines.append(f"| {c} | " + " | ".join(f"{r:.1f}" for r in rates) + " | " +
                     " | ".join(f"{r:.2f}x" if r else "-" for r in ratios) + " |")
    return "\n".join(lines)


def find_binary(path: str) -> str:
    """PATH as given, or looked up on $PATH when it names no file."""
    return path if os.path.exists(path) else (shutil.which(path) or path)
