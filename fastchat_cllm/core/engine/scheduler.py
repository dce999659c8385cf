"""Which requests run in the next engine step, and in which slot.

Waiting requests take free slots in arrival order. Every decoding request runs its window in
every step's forward of windows; prompts are prefilled in chunks, `chunk` prompt tokens per step
in all (earliest first), each chunk in a forward of its own, so a long prompt delays the others
by at most one chunk per step. A request whose window cannot be made is failed here and runs in
no forward.

A request alone in its forward sizes its own window. When several share the forward of windows,
the runner pads every row to the longest, so the forward costs c(rows) x g(width) and any row
may use the whole width at no extra cost: `choose_width` picks the width with the best expected
tokens per second over all the rows (`cost`: a BatchCost, measured by the engine), and each
adaptive row runs min(width, its own largest window).
"""
from __future__ import annotations

from collections import deque

from ..window_size import BatchCost, choose_width
from .request import Request
from .runner import Row
from .slot_cache import SlotCache


class Scheduler:
    def __init__(self, cache: SlotCache, chunk: int, cost: BatchCost):
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

    def schedule(self) -> tuple[list[tuple[Request, Row]], list[tuple[Request, Row]]]:
        """(the prompt chunks of this step, the windows of its decoding requests in slot order)."""
        self.admit()
        chunks, windows, budget, sized = [], [], self.chunk, []
        for slot in sorted(self.running):
            request = self.running[slot]
            if request.prefilling:
                if budget:
                    row = request.prefill_row(budget)
                    budget -= len(row.tokens)
                    chunks.append((request, row))
            elif request.sized_by_batch:
                sized.append(request)
            else:
                self.add_window(windows, request)
        if len(sized) == 1 and not windows:
            self.add_window(windows, sized[0])                  # alone: it sizes its own window
        elif sized:
            bounds = [r.sizer.batch_bounds(r.tokens_left) for r in sized]
            curves = [r.sizer.batch_curve(high) for r, (_, high) in zip(sized, bounds)]
            fixed = max((len(row.tokens) for _, row in windows), default=0)
            width = choose_width(curves, [low for low, _ in bounds], fixed,
                                 len(sized) + len(windows), self.cost)
            for request, curve in zip(sized, curves):     # the padding is free: use it
                self.add_window(windows, request, min(max(width, fixed), len(curve)))
        windows.sort(key=lambda pair: pair[0].slot)
        return chunks, windows

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
