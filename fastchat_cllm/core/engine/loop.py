"""One engine on a thread of its own, for callers on many threads (the worker's requests).

Only the loop's thread calls the engine (add, cancel, step), so no lock is held around torch: a
caller hands its request over as an order and reads its Steps from a queue of its own. The loop
applies the orders that arrived, runs one forward while any request is queued or running, and
sleeps when there is none. A caller that stops reading (closes its iterator) cancels its request
before the next forward, and the slot is free for the next request.

    loop = EngineLoop(lambda: Engine(load_model(), slots=8, max_len=2048))   # built on its thread
    for step in loop.submit(prompt_ids, config):      # from any thread
        ...
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Callable, Iterator

import torch

from ..config import JacobiConfig
from ..step import Step
from .engine import Engine, Failure

COUNTS = ("requests", "finished", "cancelled", "failed", "refused")


class Submission:
    """One caller's request: its prompt and config in, its Steps (or a Failure) out."""

    def __init__(self, prompt: list[int], config: JacobiConfig):
        self.prompt, self.config = prompt, config
        self.results: queue.SimpleQueue[Step | Failure] = queue.SimpleQueue()
        self.request_id: int | None = None         # the engine's, once the loop added it


class EngineLoop:
    """Drives an engine on a daemon thread until close(); status() is safe from any thread.

    `engine` is an Engine, or a function that builds one (loads the model, allocates the
    cache), which then runs on the loop's thread: EngineLoop returns once it has, and raises
    what it raised. Building on the loop's thread keeps every parallel CPU kernel on that one
    thread. A second thread that runs them (the main thread loading the model) leaves its own
    OpenMP team behind; with more OpenMP threads than cores, libgomp stops spinning between
    parallel regions, and every forward of the loop then waits on sleeping threads: a forward
    of 8 one-token windows of SmolLM2 took 80 ms instead of 58 on the 2-core machines here."""

    def __init__(self, engine: Engine | Callable[[], Engine]):
        self.orders: list[tuple[str, Submission]] = []     # ("add" | "cancel", submission)
        self.wake = threading.Condition()
        self.ready = threading.Event()                     # the constructor has finished
        self.stopped = False
        self.live: dict[int, Submission] = {}             # by request id (loop thread only)
        self.counts: Counter[str] = Counter()              # COUNTS (loop thread only)
        built: queue.SimpleQueue[Engine | BaseException] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, args=(engine, built), name="engine-loop",
                                       daemon=True)
        self.thread.start()
        try:
            result = built.get()
            if isinstance(result, BaseException):
                self.thread.join()           # it returned after handing the error over
                raise result
            self.engine = result
            self.cache_mib = round(result.cache.nbytes() / 2 ** 20, 1)
            self.snapshot = self.describe()
        except BaseException:        # the build failed, or Ctrl-C while it ran: no loop is left
            self.stopped = True
            raise
        finally:
            self.ready.set()

    @property
    def max_len(self) -> int:
        return self.engine.cache.max_len

    def submit(self, prompt_ids, config: JacobiConfig) -> Iterator[Step]:
        """The request's Steps as the engine makes them. It is handed over when the first is
        asked for; closing the iterator before the last cancels it; a Failure raises its error."""
        if self.stopped:
            raise RuntimeError("the engine loop was stopped")
        submission = Submission(list(prompt_ids), config)
        self.order("add", submission)
        done = False
        try:
            while not done:
                result = submission.results.get()
                done = isinstance(result, Failure) or result.finish_reason is not None
                if isinstance(result, Failure):
                    raise result.error
                yield result
        finally:
            if not done:
                self.order("cancel", submission)

    def status(self) -> dict:
        """Slots (total, active), waiting requests, the cache, request counts, and the batch's
        Jacobi forwards and tokens (as of the last forward)."""
        return dict(self.snapshot)

    def close(self) -> None:
        """Stop the thread after the forward in flight; unfinished callers get an error."""
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join()
        stopped = Failure(RuntimeError("the engine loop was stopped"))
        with self.wake:
            pending, self.orders = self.orders, []
        for submission in [*self.live.values(), *(s for _, s in pending)]:
            submission.results.put(stopped)

    def order(self, kind: str, submission: Submission) -> None:
        with self.wake:
            self.orders.append((kind, submission))
            self.wake.notify()

    # --- the loop's thread ---------------------------------------------------------------

    def run(self, engine: Engine | Callable[[], Engine], built: queue.SimpleQueue) -> None:
        try:
            built.put(engine() if callable(engine) else engine)
        except BaseException as error:            # handed to the constructor's caller
            built.put(error)
            return
        self.ready.wait()
        while not self.stopped and self.wait_for_work():
            try:
                self.serve_once()
            except Exception as error:    # a bug outside any request: none may wait forever
                self.fail_live(error)

    def serve_once(self) -> None:
        with self.wake:
            orders, self.orders = self.orders, []
        for kind, submission in orders:
            (self.add if kind == "add" else self.cancel)(submission)
        if self.engine.has_work:
            self.deliver(self.step())
        self.snapshot = self.describe()

    def fail_live(self, error: BaseException) -> None:
        """Fail every live request with `error` and free its slot; the loop serves on."""
        failure = Failure(error)
        for request_id, submission in list(self.live.items()):
            try:
                self.engine.cancel(request_id)
            except Exception:
                pass                      # its slot is lost with the engine's state; others go on
            submission.results.put(failure)
        self.counts["failed"] += len(self.live)
        self.live.clear()

    def wait_for_work(self) -> bool:
        """Sleep until an order arrives or the engine has work; False once stopped."""
        with self.wake:
            while not (self.orders or self.engine.has_work or self.stopped):
                self.wake.wait()
            return not self.stopped

    def add(self, submission: Submission) -> None:
        try:
            submission.request_id = self.engine.add(submission.prompt, submission.config)
        except Exception as error:                    # refused (empty, longer than a slot)
            self.counts["refused"] += 1
            submission.results.put(Failure(error))
            return
        self.counts["requests"] += 1
        self.live[submission.request_id] = submission

    def cancel(self, submission: Submission) -> None:
        if self.live.pop(submission.request_id, None) is not None:
            self.engine.cancel(submission.request_id)
            self.counts["cancelled"] += 1

    def step(self) -> list[tuple[int, Step | Failure]]:
        """engine.step(); should it raise (a fault of no request nor forward: a bug), every
        live request fails and the loop goes on serving new ones."""
        try:
            with torch.inference_mode():
                return self.engine.step()
        except Exception as error:
            for request_id in self.live:
                self.engine.cancel(request_id)
            return [(request_id, Failure(error)) for request_id in self.live]

    def deliver(self, results: list[tuple[int, Step | Failure]]) -> None:
        for request_id, result in results:
            self.live[request_id].results.put(result)
            if isinstance(result, Failure) or result.finish_reason is not None:
                del self.live[request_id]
                self.counts["failed" if isinstance(result, Failure) else "finished"] += 1

    def describe(self) -> dict:
        scheduler, totals = self.engine.scheduler, self.engine.totals
        return {"slots": self.engine.cache.slots, "active_slots": len(scheduler.running),
                "waiting": len(scheduler.waiting), "max_len": self.max_len,
                "cache_mib": self.cache_mib, "compiled": self.engine.runner.compiled is not None,
                "eager_steps": self.engine.runner.eager_steps,
                **{name: self.counts[name] for name in COUNTS},
                "forwards": totals.forwards, "tokens": totals.tokens,
                "tokens_per_forward": round(totals.tokens_per_forward, 4),
                "prompt_tokens": totals.prompt_tokens, "cached_prompt_tokens": totals.cached_tokens}
