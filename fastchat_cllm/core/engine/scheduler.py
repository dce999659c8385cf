"""Which requests run in the next forward, and in which slot.

Waiting requests take free slots in arrival order. Every decoding request runs its window in
every forward; prompts are prefilled in chunks, `chunk` prompt tokens per forward in all
(earliest first), so a long prompt delays the others by at most one chunk per forward. A request
whose window cannot be made is failed here and runs in no forward.
"""
from __future__ import annotations

from collections import deque

from .request import Request
from .runner import Row
from .slot_cache import SlotCache


class Scheduler:
    def __init__(self, cache: SlotCache, chunk: int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.cache, self.chunk = cache, chunk
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
        batch, budget = [], self.chunk
        for slot in sorted(self.running):
            request = self.running[slot]
            if not request.prefilling:
                try:
                    batch.append((request, request.window_row()))
                except Exception as error:      # its guesses or window size: it alone fails
                    request.fail(error)
            elif budget:
                row = request.prefill_row(budget)
                budget -= len(row.tokens)
                batch.append((request, row))
        return batch

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
