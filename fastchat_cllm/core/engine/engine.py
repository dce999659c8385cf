"""The batched Jacobi engine: requests come and go; each step is one forward over all of their
windows and the prompt chunks being prefilled, packed without padding (runner.py).

    engine = Engine(model, slots=4, max_len=1024)
    a = engine.add(prompt_ids, JacobiConfig(max_new_tokens=64))
    while engine.has_work:
        for request_id, step in engine.step():
            ...          # a Step, or a Failure: that request stopped on an error

Memory is explicit: the slot cache holds slots x max_len positions of keys/values for every
layer, allocated up front (SmolLM2-135M: ~46 KB per position in fp32). The model's attention
must go through transformers' AttentionInterface (eager, SDPA); full-attention layers only.

Prefix caching (on unless `prefix_cache=False`): a request starts from the longest prefix of
its prompt that a slot holds, left by an earlier request or copied from a running one, and only
the rest is prefilled; the keys/values are the same function of the same ids, computed in other
forwards (in fp32 a different batch shape may round differently: only near-ties can change).

`compile=True` compiles the step (torch.compile) before the constructor returns (CompileError
when it cannot): SmolLM2 on this project's 2-core CPU took 47-87 s, and each forward then ran
~1.9x faster (the README).

Faults stay where they happen: an exception while making one request's window or verifying its
logits fails that request alone; when a forward raises, its rows run again one by one and a
request whose row raises alone fails. Either way the failed requests leave their slots and the
engine serves the rest.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..config import JacobiConfig
from ..packed_linear import is_packed
from ..stats import tokens_per_forward
from ..step import Step
from ..window_size import BatchCost
from .request import Request
from .runner import Row, Runner
from .scheduler import Scheduler
from .slot_cache import SlotCache


@dataclass(frozen=True)
class Failure:
    """A request's terminal result when decoding it raised `error`."""

    error: BaseException


@dataclass
class BatchTotals:
    """The whole batch's Jacobi counts: forwards that verified at least one window, and the
    tokens those windows made final (tokens_per_forward's definition, over all requests)."""

    forwards: int = 0
    tokens: int = 0
    prompt_tokens: int = 0      # of the requests admitted to a slot
    cached_tokens: int = 0      # of those, found in the cache (not prefilled)

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(self.tokens, self.forwards)


def widest(batch: list[tuple[Request, Row]], grown: bool) -> int:
    """The widest window of the batch's rows that a lookup grew (`grown`) or did not; 0: none."""
    return max((len(row.tokens) for request, row in batch if request.grown is grown), default=0)


class Engine:
    def __init__(self, model, slots: int = 4, max_len: int = 2048, chunk: int = 64,
                 prefix_cache: bool = True, compile: bool = False):
        if compile and is_packed(model):
            raise ValueError("a compiled step takes the model loaded without pack (it prepacks "
                             "the weights it freezes itself)")
        self.model = model
        self.cache = SlotCache(model, slots, max_len)
        self.runner = Runner(model, self.cache, compile)
        device = torch.device(model.device).type
        # a request's sizer: a compiled step of one token runs as two (no cost step at 2 tokens),
        # prepacked weights (packed_linear) leave a small one; a batch's forward keeps the
        # device's (8 rows of 2 cost ~1.3x 8 rows of 1, compiled or packed)
        self.cost_kind = device + ("-compiled" if compile else "-packed" if is_packed(model)
                                   else "")
        self.cost = BatchCost(device)    # seconds by rows and width
        self.scheduler = Scheduler(self.cache, chunk, self.cost, prefix_cache)
        self.ids = itertools.count()
        self.totals = BatchTotals()

    def add(self, prompt_ids, config: JacobiConfig | None = None, **options) -> int:
        """Queue a request (prompt_ids: [P] or [1, P]); its id."""
        config = config or JacobiConfig(**options)
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().tolist()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + config.max_new_tokens > self.cache.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({config.max_new_tokens})"
                             f" exceeds the engine's max_len {self.cache.max_len}")
        request = Request(next(self.ids), prompt, config, self.model.device, self.cost_kind)
        self.scheduler.add(request)
        return request.id

    def step(self) -> list[tuple[int, Step | Failure]]:
        """One engine step: one forward over the scheduled prompt chunks and every decoding
        request's window (packed: no padding); by request id, the Steps they made and the
        Failures of requests they stopped."""
        admitted = self.scheduler.admit()
        self.totals.prompt_tokens += sum(len(r.prompt) for r in admitted)
        self.totals.cached_tokens += sum(r.cached for r in admitted)
        chunks, windows = self.scheduler.schedule()     # a request whose window fails is failed
        results = self.run(chunks + windows, priced=not chunks) if chunks or windows else []
        results += [(r.id, Failure(r.error)) for r in self.scheduler.running.values() if r.error]
        self.scheduler.release_finished()
        return results

    def run(self, batch: list[tuple[Request, Row]], priced: bool = False) -> list[tuple[int, Step]]:
        """The forward over `batch` and the Steps its requests made of it. When the forward
        raises, each row runs again alone, and a request whose row raises alone fails. A forward
        of windows only (`priced`) is measured for the scheduler's window sizing, by its rows
        and its widest window, unless that window is a row a lookup grew past every other row
        (its price is not that of every row that wide)."""
        try:
            out = self.runner.run([row for _, row in batch])
        except Exception as error:
            if len(batch) > 1:
                return [made for pair in batch for made in self.run([pair])]
            batch[0][0].fail(error)
            return []
        if priced and widest(batch, grown=True) <= widest(batch, grown=False):
            self.cost.observe(len(batch), max(len(row.tokens) for _, row in batch), out.seconds)
        alone = out.seconds if len(batch) == 1 else None    # a shared forward is priced above
        made = [(request.id, self.advance(request, row, logits, alone))
                for (request, row), logits in zip(batch, out.logits)]
        made = [(request_id, step) for request_id, step in made if step is not None]
        self.count([step for _, step in made])
        return made

    def advance(self, request: Request, row: Row, logits: torch.Tensor,
                seconds: float | None) -> Step | None:
        """The request's Step from its logits of the forward, its rejected guesses trimmed; None
        for a prompt chunk that is not the last, or when verifying raised (the request fails)."""
        try:
            step = request.advance(row, logits, seconds)
        except Exception as error:              # this request's verification: it alone fails
            request.fail(error)
            return None
        if step is not None:
            self.cache.trim(request.slot, len(step.window) - step.accepted)
        return step

    def count(self, steps: list[Step]) -> None:
        accepted = [step.accepted for step in steps if step.window]
        if accepted:
            self.totals.forwards += 1
            self.totals.tokens += sum(accepted)

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its slot; False when it was not queued or running."""
        return self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work
