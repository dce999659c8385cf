"""Which requests run in the next forward, and in which slot.

Waiting requests take free slots in arrival order. Every decoding request runs its window in
every forward; prompts are prefilled in chunks, `chunk` prompt tokens per forward in all
(earliest first), so a long prompt delays the others by at most one chunk per forward. A request
whose window cannot be made is failed here and runs in no forward.

A request alone in its forward sizes its own window; when rows share a forward, the windows of
the adaptive ones are split by `allocate` against the price of the whole forward (`cost`: its
seconds by total positions, measured by the engine).
"""
from __future__ import annotations

from collections import deque

from ..window_size import ForwardCost, allocate
from .request import Request
from .runner import Row
from .slot_cache import SlotCache


class Scheduler:
    def __init__(self, cache: SlotCache, chunk: int, cost: ForwardCost):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.cache, self.chunk, self.cost = cache, chunk, cost
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}        # slot -> request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> None:
        """Move waiting requests into free slots (lowest first)."""
        free = [s for s in range(self.cache.slots) if s not in self.running]
        while self.waiting and free:
            request = self.waiting.popleft()
            request.slot = free.pop(0)
            self.cache.clear(request.slot)
            self.running[request.slot] = request

    def schedule(self) -> list[tuple[Request, Row]]:
        """The rows of the next forward, in slot order."""
        self.admit()
        batch, budget, sized = [], self.chunk, []
        for slot in sorted(self.running):
            request = self.running[slot]
            if request.prefilling:
                if budget:
                    row = request.prefill_row(budget)
                    budget -= len(row.tokens)
                    batch.append((request, row))
            elif request.sized_by_batch:
                sized.append(request)
            else:
                self.add_window(batch, request)
        if len(sized) == 1 and not batch:
            self.add_window(batch, sized[0])                    # alone: it sizes its own window
        elif sized:
            bounds = [r.sizer.batch_bounds(r.tokens_left) for r in sized]
            curves = [r.sizer.expected_tokens(high) for r, (_, high) in zip(sized, bounds)]
            fixed = sum(len(row.tokens) for _, row in batch)
            sizes = allocate(curves, [low for low, _ in bounds], fixed, self.cost)
            for request, size in zip(sized, sizes):
                self.add_window(batch, request, size)
        batch.sort(key=lambda pair: pair[0].slot)
        return batch

    @staticmethod
    def add_window(batch: list, request: Request, size: int | None = None) -> None:
        """Append the request's next window to `batch`; a request whose window cannot be made
        (its guesses, its size) fails alone."""
        try:
            batch.append((request, request.window_row(size)))
        except Exception as error:
            request.fail(error)

    def release_finished(self) -> None:
        for slot in [s for s, r in self.running.items() if r.finish_reason is not None]:
            self.release(slot)

    def release(self, slot: int) -> None:
        del self.running[slot]
        self.cache.clear(slot)

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is; False when it is not here (finished or unknown)."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for slot, request in self.running.items():
            if request.id == request_id:
                self.release(slot)
                return True
        return False
