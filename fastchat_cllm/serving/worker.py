"""The Jacobi model worker: FastChat's model-worker protocol with the generate step replaced.

Registers with the stock controller and heartbeats (BaseModelWorker), but only once its HTTP
server listens: the controller drops a worker whose /worker_get_status is refused, and the API
server's /v1/models asks it to check every worker.

One batched engine serves every request: `--limit-worker-concurrency` slots of `--max-len`
positions, allocated at start-up and driven by one thread (core/engine/loop.py). Each request's
gate runs in Starlette's thread pool, hands its prompt to that thread and streams its own Steps;
a semaphore holds requests beyond the slots. The routes are FastChat's model-worker protocol on
an app of our own (worker_app): a client that hangs up mid-stream closes the gate after its
next Step, which cancels its request before the next forward. Usage carries per-request Jacobi
counts; the status their totals and the batch's (slots in use, tokens per forward of the whole
batch).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import threading
import time
import uuid
from contextlib import closing
from functools import partial

import requests
import torch
from fastchat.constants import SERVER_ERROR_MSG, ErrorCode
from fastchat.model.model_adapter import add_model_args
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastchat.serve.base_model_worker import BaseModelWorker
from fastchat.utils import str_to_torch_dtype
from starlette.concurrency import iterate_in_threadpool

from .. import loading
from ..core.engine import CompileError, Engine, EngineLoop, SlotCache
from ..core.gguf_linear import is_quantized
from ..core.gguf_linear import summary as quantized_summary
from ..core.packed_linear import is_packed, pack_for_inference
from ..core.stats import tokens_per_forward
from .adapter import CllmAdapter
from .compat import context_length
from .counting import count_prompt_tokens, max_chars_per_token
from .faults import maybe_inject_fault, maybe_inject_oom
from .options import add_jacobi_args, jacobi_config
from .params import ParamError
from .responses import ClosingStream
from .stream import generate_stream, vocab_size

log = logging.getLogger("fastchat_cllm.worker")

# Stock flags that pick a loader the Jacobi engine cannot run: (flag, is it set?).
UNSUPPORTED = (
    ("--load-8bit", lambda a: a.load_8bit), ("--cpu-offloading", lambda a: a.cpu_offloading),
    ("--gptq-ckpt/--gptq-wbits", lambda a: a.gptq_ckpt or a.gptq_wbits < 16),
    ("--awq-ckpt/--awq-wbits", lambda a: a.awq_ckpt or a.awq_wbits < 16),
    ("--enable-exllama", lambda a: a.enable_exllama), ("--enable-xft", lambda a: a.enable_xft),
    ("--embed-in-truncate", lambda a: getattr(a, "embed_in_truncate", False)),   # no embeddings
)
DEFAULT_SLOTS = 8
# --max-len default: the model's context, at most this. SmolLM2-135M keeps ~46 KB of keys and
# values per position in fp32: 8 slots x 2048 positions = 720 MiB, under 1 GB.
DEFAULT_MAX_LEN = 2048
PREFILL_CHUNK = 256       # --prefill-chunk default: prompt tokens per engine step, all prompts
NO_EMBEDDINGS = ("the Jacobi worker serves generation only; run FastChat's model_worker for "
                 "embeddings")


class StartupError(RuntimeError):
    """The worker cannot start; the message says why (printed without a traceback)."""


class JacobiTotals:
    """Jacobi counts: forwards and tokens live, requests when finished (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.forwards = self.tokens = 0

    def advance(self, usage: dict, last: dict) -> None:
        """Count, as it happens, what a request's `usage` adds to its previous `last` usage (a
        client that hangs up stops the counts: its decoding stopped)."""
        with self.lock:
            self.forwards += usage.get("jacobi_forwards", 0) - last.get("jacobi_forwards", 0)
            self.tokens += usage.get("jacobi_tokens", 0) - last.get("jacobi_tokens", 0)

    def finish(self) -> None:
        with self.lock:
            self.requests += 1

    def summary(self) -> dict:
        with self.lock:
            rate = tokens_per_forward(self.tokens, self.forwards)
            return {"requests": self.requests, "forwards": self.forwards, "tokens": self.tokens,
                    "tokens_per_forward": round(rate, 4)}


def _chunk(payload: dict) -> bytes:
    return json.dumps(payload).encode() + b"\0"


class JacobiWorker(BaseModelWorker):
    """BaseModelWorker (registration, heartbeats, status, token counts, templates) over our
    loader and generate step. The model loads before BaseModelWorker resolves the template, so
    the template comes from the loaded tokenizer. (Not a ModelWorker: importing
    fastchat.serve.model_worker hijacks stdout/stderr and writes a log file into the cwd.)"""

    def __init__(self, args: argparse.Namespace, jacobi):
        self.totals = JacobiTotals()
        self.registration_failed = False
        self.device, self.seed = args.device, args.seed
        self.stream_interval = args.stream_interval
        half = args.device.startswith("cuda")      # FastChat's default: fp16 on GPU, fp32 else
        dtype = str_to_torch_dtype(args.dtype) or (torch.float16 if half else torch.float32)
        revision = args.revision if args.revision != "main" else None
        loaded = {}

        def build() -> Engine:       # on the engine's own thread: see EngineLoop
            model, tokenizer = load(args, dtype, revision)
            loaded.update(model=model, tokenizer=tokenizer)
            max_len = args.max_len or min(context_length(model.config), DEFAULT_MAX_LEN)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            cache = SlotCache.bytes_for(model, args.limit_worker_concurrency, max_len)
            compile, why = compile_step(args.compile, model.device, weights * 3 // 2 + cache,
                                        available_memory())
            if why:
                log.warning("--compile auto: the step runs eagerly: %s", why)
            if compile:
                log.info("compiling the engine's step (torch.compile; on a 2-core CPU about a "
                         "minute; --compile off skips it)")
            return build_engine(model, args.limit_worker_concurrency, max_len, args.prefill_chunk,
                                not args.no_prefix_cache, compile, args.compile == "on")

        self.engine = EngineLoop(build)
        try:
            self.finish_start_up(args, loaded["model"], loaded["tokenizer"], jacobi)
        except BaseException:
            self.engine.close()
            raise

    def finish_start_up(self, args: argparse.Namespace, model, tokenizer, jacobi) -> None:
        max_len = self.engine.max_len
        CllmAdapter.claim(args.model_path)
        CllmAdapter.tokenizers[args.model_path] = tokenizer
        super().__init__(args.controller_address, args.worker_address, str(uuid.uuid4())[:8],
                         args.model_path, args.model_names, args.limit_worker_concurrency,
                         conv_template=args.conv_template)
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model_context = context_length(model.config)     # the prompt is cut to this
        self.context_len = min(self.model_context, max_len)   # what the API server sees
        max_chars_per_token(tokenizer)      # computed now, not inside the first request
        self.generate_stream_func = partial(generate_stream, jacobi=jacobi)
        log.info("serving %s as %s with %s", args.model_path, self.model_names, jacobi)
        log.info("slot cache: %d slots x %d positions = %.1f MiB (--limit-worker-concurrency x "
                 "--max-len), prefix caching %s", args.limit_worker_concurrency, max_len,
                 self.engine.status()["cache_mib"], "off" if args.no_prefix_cache else "on")
        compiled = self.engine.engine.runner.compile_seconds
        log.info("engine step: %s", f"compiled in {compiled:.0f} s" if compiled else
                 "eager" + (", linear layers prepacked" if is_packed(model) else ""))
        if is_quantized(model):
            log.info("linear layers: %s", quantized_summary(model))

    def count_token(self, params: dict) -> dict:
        """The prompt's token count for the API server's length check, tokenizing no more of a
        huge prompt than proves it over the context."""
        count = count_prompt_tokens(self.tokenizer, str(params.get("prompt", "")), self.context_len)
        return {"count": count, "error_code": 0}

    def get_status(self) -> dict:
        return {**super().get_status(), "jacobi": self.totals.summary(),
                "batch": self.engine.status()}

    def generate_stream_gate(self, params: dict):
        self.call_ct += 1
        try:
            if self.seed is not None:       # --seed: the seed of requests that name none
                params = {"seed": self.seed, **params}
            maybe_inject_oom(params)
            engine = maybe_inject_fault(params, self.engine, vocab_size(self.model))
            last = {}
            outs = self.generate_stream_func(self.model, self.tokenizer, params, self.device,
                                             self.model_context, self.stream_interval,
                                             engine=engine)
            with closing(outs):             # a client hanging up cancels the request
                for out in outs:
                    self.totals.advance(out["usage"], last)
                    last = out["usage"]
                    yield _chunk({**out, "error_code": 0})
            self.totals.finish()
        except ParamError as e:
            yield _chunk({"text": str(e), "error_code": e.code})
        except torch.cuda.OutOfMemoryError as e:
            yield _chunk({"text": f"{SERVER_ERROR_MSG}\n\n({e})",
                          "error_code": ErrorCode.CUDA_OUT_OF_MEMORY})
        except Exception as e:   # answered as an error chunk: a cut stream helps no client
            log.exception("generation failed")
            yield _chunk({"text": f"{SERVER_ERROR_MSG}\n\n({e})",
                          "error_code": ErrorCode.INTERNAL_ERROR})

    def generate_gate(self, params: dict) -> dict:
        for chunk in self.generate_stream_gate(params):
            pass
        return json.loads(chunk[:-1])

    def get_embeddings(self, params: dict) -> dict:
        return {"text": NO_EMBEDDINGS, "error_code": ErrorCode.PARAM_OUT_OF_RANGE}


def load(args: argparse.Namespace, dtype, revision):
    """(model, tokenizer) of --model-path; StartupError when it cannot be loaded."""
    try:
        return loading.load(args.model_path, dtype, args.device, args.num_gpus,
                            args.max_gpu_memory, revision,
                            quantized=not args.dequantize
                            and loading.quantized_by_default(args.model_path))
    except Exception as e:   # whatever the loaders raise: one line at start-up
        raise StartupError(f"cannot load --model-path {args.model_path}: "
                           f"{type(e).__name__}: {e}") from e


def compile_step(choice: str, device, needed: int, available: int | None) -> tuple[bool, str]:
    """--compile: (compile?, why auto does not where it would). auto compiles on the CPU, where
    it was measured to win (the README), when memory holds it (a second, prepacked copy of the
    weights: SmolLM2 fp32 took 1.35x its weights more; `needed`: 1.5x the weights' bytes and the
    cache's, `available` what the system has left, None: unknown); not on CUDA, where it has
    not been measured yet."""
    if choice != "auto" or torch.device(device).type != "cpu":
        return choice == "on", ""
    if available is not None and available < needed:
        return False, (f"it would need about {needed / 2 ** 30:.1f} GiB more memory, "
                       f"{available / 2 ** 30:.1f} GiB is available (--compile on insists)")
    return True, ""


def available_memory() -> int | None:
    """Bytes the worker may still take: MemAvailable of /proc/meminfo, or less where a cgroup
    (v2: a container's limit) allows less; None where neither says."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo
                      if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def build_engine(model, slots: int, max_len: int, chunk: int, prefix_cache: bool = True,
                 compile: bool = False, required: bool = True) -> Engine:
    """The worker's one engine, its slot cache allocated, its step compiled if `compile`; a step
    that cannot be compiled stops start-up when `required` (--compile on), else (auto) the
    engine runs it eagerly, with a warning. An eager step on the CPU runs on prepacked weights
    (packed_linear, as a compiled step's are)."""
    if not compile:
        pack_for_inference(model)
    try:
        return Engine(model, slots, max_len, chunk, prefix_cache, compile)
    except CompileError as e:
        if required:
            raise StartupError(f"{e} (--compile off runs the step eagerly)") from e
        log.warning("%s; the engine runs its step eagerly (--compile off skips trying)", e)
    except (ValueError, RuntimeError) as e:       # unsupported attention, no memory for it
        raise StartupError(f"cannot build the engine ({slots} slots x {max_len} positions): "
                           f"{e}") from e
    torch._dynamo.reset()      # out of the except: the failed engine (its cache, any graph and
    gc.collect()               # its frozen weights) is gone before the eager one is built
    return build_engine(model, slots, max_len, chunk, prefix_cache)


def build_parser() -> argparse.ArgumentParser:
    """Every stock model_worker flag (same names) plus the Jacobi flags."""
    parser = argparse.ArgumentParser(description="FastChat model worker decoding with Jacobi "
                                                 "iterations (fastchat-cllm)",
                                     usage="%(prog)s [options]   (--help lists them)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", default=None,
                        help="URL the controller reaches this worker at (default: from host/port)")
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    add_model_args(parser)
    parser.set_defaults(model_path=loading.DEFAULT_MODEL, device=None)   # None: cuda if present
    parser.add_argument("--model-names", type=lambda s: s.split(","),
                        help="comma-separated names to serve the model under")
    parser.add_argument("--conv-template", default=None, help="conversation prompt template")
    parser.add_argument("--embed-in-truncate", action="store_true")
    parser.add_argument("--limit-worker-concurrency", type=int, default=DEFAULT_SLOTS,
                        help="requests decoded together: the engine's slots (more wait)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="positions (prompt + answer) of each slot's cache (default: the "
                             f"model's context, at most {DEFAULT_MAX_LEN})")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                        help="prompt tokens prefilled per engine step, all new prompts together "
                             "(in the step's one forward, beside the windows: what a long prompt "
                             "may slow the others' next window by)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt in full (by default a request starts from the "
                             "longest prefix of its prompt the slots hold: a shared system "
                             "prompt, the earlier turns of a chat; in fp32 the reused keys/values "
                             "may round differently, so a near-tie can change)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="compile the engine's step with torch.compile at start-up, before "
                             "the worker registers (auto: on the CPU, where each forward of "
                             "SmolLM2 ran ~1.9x faster than the eager step on torch's nn.Linear "
                             "and up to ~1.2x faster than today's eager step on prepacked "
                             "weights, and the compile took about a minute on 2 cores, unless "
                             "the memory left is less than 1.5x the weights and the slot cache: it keeps a second, prepacked copy of the weights; "
                             "off on CUDA, not measured there yet)")
    parser.add_argument("--dequantize", action="store_true",
                        help="run a GGUF model on float32 weights dequantized at load (by "
                             "default, on the CPU in float32, its linear layers read the file's "
                             "quantized blocks: Q4_0, Q4_1, Q8_0; other types are dequantized, "
                             "named in the log; a LoRA adapter on a GGUF is merged into float32 "
                             "weights either way, measured faster)")
    parser.add_argument("--stream-interval", type=int, default=2)
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--seed", type=int, default=None,
                        help="the sampling seed of every request that names none (each "
                             "such request then repeats its text)")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--ssl", action="store_true",
                        help="serve HTTPS (env SSL_KEYFILE and SSL_CERTFILE)")
    add_jacobi_args(parser)
    return parser


def refuse_unsupported(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop on a stock loader flag the Jacobi engine cannot run (worker and terminal chat)."""
    for flag, is_set in UNSUPPORTED:
        if is_set(args):
            parser.error(f"{flag} cannot be honoured: the Jacobi engine runs the transformers "
                         f"model itself (full or half precision weights)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what the worker cannot honour, with the reason, before loading anything."""
    refuse_unsupported(parser, args)
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if args.limit_worker_concurrency < 1:
        parser.error("--limit-worker-concurrency must be >= 1")
    if args.max_len is not None and args.max_len < 2:
        parser.error(f"--max-len must be >= 2 (a prompt token and a new one), got {args.max_len}")
    if args.prefill_chunk < 1:
        parser.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.conv_template:
        from fastchat.conversation import conv_templates

        if args.conv_template not in conv_templates:
            parser.error(f"unknown --conv-template {args.conv_template!r}")
    try:
        loading.placement(args.device, args.num_gpus, args.max_gpu_memory)
    except ValueError as e:
        parser.error(str(e))
    try:
        loading.resolve(args.model_path)
    except (ValueError, FileNotFoundError) as e:     # one line: it names the path or file
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible (use --device cpu)")
    args.worker_address = args.worker_address or f"http://{args.host}:{args.port}"
    args.model_names = args.model_names or [loading.model_name(args.model_path)]


def controller_reachable(address: str) -> bool:
    try:
        return requests.post(address + "/list_models", timeout=10).ok
    except requests.RequestException:
        return False


def create_worker(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus   # before CUDA is first touched
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(parser, args)
    config = jacobi_config(parser, args)
    if not args.no_register and not controller_reachable(args.controller_address):
        parser.exit(1, f"{parser.prog}: error: cannot reach the controller at "
                       f"{args.controller_address} (start it first, or --no-register)\n")
    try:
        return args, JacobiWorker(args, config)
    except StartupError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def keep_alive_seconds() -> float:
    """How often a queued stream gets an empty chunk: a quarter of FastChat's worker timeout
    (FASTCHAT_WORKER_API_TIMEOUT, 100 s), which its readers put on each read."""
    from fastchat.constants import WORKER_API_TIMEOUT
    return WORKER_API_TIMEOUT / 4


async def queued_answer(worker: JacobiWorker, params: dict, every: float):
    """The gate's chunks once the request has a place in the worker's semaphore; until then
    an empty chunk (a lone b"\\0", which every FastChat reader skips) each `every` s, so that
    no reader's per-read timeout (the web UI's, FastChat's API server's) runs out in the queue.
    Closed (by ClosingStream), it closes the gate, which cancels its engine request, and then
    gives its place back, even when closing the gate raised."""
    gate = worker.generate_stream_gate(params)
    place = asyncio.ensure_future(worker.semaphore.acquire())    # in line once: FIFO kept
    try:
        while not (await asyncio.wait({place}, timeout=every))[0]:
            yield b"\0"
        place.result()
        async for chunk in iterate_in_threadpool(gate):   # a next() in flight is waited for
            yield chunk
    finally:
        try:
            gate.close()
        finally:
            if not place.done():
                place.cancel()          # (a place handed over meanwhile: acquire gives it back)
            elif not place.cancelled() and place.exception() is None:
                worker.semaphore.release()


def worker_app(worker: JacobiWorker) -> FastAPI:
    """FastChat's model-worker routes (the paths, requests and replies of
    fastchat.serve.base_model_worker's app) for `worker`, on an app of its own: a streamed
    answer's gate is closed when the stream ends, client hung up or not (which cancels its
    engine request after its next Step), not when it is garbage collected, and its place in
    the semaphore given back then (responses.ClosingStream, queued_answer); while it waits for
    a place, its reader gets empty chunks. Unlike the stock routes, both
    generate routes release their place when the gate raises, and /worker_get_embeddings (an
    error: NO_EMBEDDINGS) takes none. /worker_generate (which FastChat's /api/v1 routes call,
    our /v1 ones not) decodes to the end whether its client waits or not, as FastChat's does."""
    app = FastAPI()
    worker.semaphore = asyncio.Semaphore(worker.limit_worker_concurrency)   # queue_length's
    every = keep_alive_seconds()

    @app.post("/worker_generate_stream")
    async def api_generate_stream(request: Request):
        params = await request.json()
        return ClosingStream(queued_answer(worker, params, every))

    @app.post("/worker_generate")
    async def api_generate(request: Request):
        params = await request.json()
        async with worker.semaphore:
            return JSONResponse(await asyncio.to_thread(worker.generate_gate, params))

    @app.post("/worker_get_embeddings")
    async def api_get_embeddings(request: Request):
        return JSONResponse(worker.get_embeddings(await request.json()))

    @app.post("/worker_get_status")
    async def api_get_status(request: Request):
        return worker.get_status()

    @app.post("/count_token")
    async def api_count_token(request: Request):
        return worker.count_token(await request.json())

    @app.post("/worker_get_conv_template")
    async def api_get_conv(request: Request):
        return worker.get_conv_template()

    @app.post("/model_details")
    async def api_model_details(request: Request):
        return {"context_length": worker.context_len}

    return app


def register_when_listening(worker: JacobiWorker, server) -> None:
    """Register (and start heartbeats) once `server` accepts connections; stop it if the
    controller refuses, so a worker never runs unlisted."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.02)
    try:
        worker.init_heart_beat()
    except (requests.RequestException, AssertionError) as e:
        log.error("cannot register with the controller at %s: %s", worker.controller_addr, e)
        server.should_exit = True
        worker.registration_failed = True
        return
    log.info("registered with the controller at %s as %s", worker.controller_addr,
             worker.worker_addr)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args, worker = create_worker(argv)
    if args.debug:
        logging.getLogger("fastchat_cllm").setLevel(logging.DEBUG)
    ssl = {"ssl_keyfile": os.environ["SSL_KEYFILE"], "ssl_certfile": os.environ["SSL_CERTFILE"]} \
        if args.ssl else {}
    server = uvicorn.Server(uvicorn.Config(worker_app(worker), host=args.host, port=args.port,
                                           log_level="debug" if args.debug else "info", **ssl))
    if not args.no_register:
        threading.Thread(target=register_when_listening, args=(worker, server),
                         daemon=True).start()
    server.run()
    if worker.registration_failed or not server.started:
        raise SystemExit(1)
