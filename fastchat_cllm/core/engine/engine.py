"""The batched Jacobi engine: requests come and go; each step is one forward over all of them.

    engine = Engine(model, slots=4, max_len=1024)
    a = engine.add(prompt_ids, JacobiConfig(max_new_tokens=64))
    while engine.has_work:
        for request_id, step in engine.step():
            ...

Memory is explicit: the slot cache holds slots x max_len positions of keys/values for every
layer, allocated up front (SmolLM2-135M: ~46 KB per position in fp32). The model must use an
attention implementation that takes a 4D mask (eager, SDPA); full-attention layers only.
"""
from __future__ import annotations

import itertools

import torch

from ..config import JacobiConfig
from ..step import Step
from .request import Request
from .runner import Runner
from .scheduler import Scheduler
from ..window_size import ForwardCost
from .slot_cache import SlotCache


class Engine:
    def __init__(self, model, slots: int = 4, max_len: int = 2048, chunk: int = 64):
        self.model = model
        self.cache = SlotCache(model, slots, max_len)
        self.runner = Runner(model, self.cache)
        self.cost = ForwardCost(torch.device(model.device).type)   # seconds by total positions
        self.scheduler = Scheduler(self.cache, chunk, self.cost)
        self.ids = itertools.count()

    def add(self, prompt_ids, config: JacobiConfig | None = None, **options) -> int:
        """Queue a request (prompt_ids: [P] or [1, P]); its id."""
        config = config or JacobiConfig(**options)
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().tolist()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + config.max_new_tokens > self.cache.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({config.max_new_tokens})"
                             f" exceeds the engine's max_len {self.cache.max_len}")
        request = Request(next(self.ids), prompt, config, self.model.device)
        self.scheduler.add(request)
        return request.id

    def step(self) -> list[tuple[int, Step]]:
        """One forward over every scheduled request; the Steps it made, by request id."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        out = self.runner.run([row for _, row in batch])
        self.cost.observe(sum(len(row.tokens) for _, row in batch), out.seconds)
        alone = out.seconds if len(batch) == 1 else None    # a shared forward is priced above
        steps = [(request, request.advance(row, logits, alone))
                 for (request, row), logits in zip(batch, out.logits)]
        for request, step in steps:
            if step is not None:
                self.cache.trim(request.slot, len(step.window) - step.accepted)
        self.scheduler.release_finished()
        return [(request.id, step) for request, step in steps if step is not None]

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its slot; False when it was not queued or running."""
        return self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work
