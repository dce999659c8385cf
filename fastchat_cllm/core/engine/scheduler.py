"""Which requests run in the next engine step, and in which slot.

Waiting requests take free slots in arrival order. With prefix caching (the default), a request
starts from the longest prefix of its prompt that the slots hold, and only the rest of its prompt
is prefilled (at least its last token runs, for the first token's logits):
- a finished request's slot keeps its prompt and answer until it is reused; a free slot whose
  whole contents are that longest prefix (the chat's earlier turns) is taken as it is;
- otherwise the prefix (a shared system prompt, say) is copied from the slot holding it, in use
  or not, into the least recently freed slot, which is what the cache evicts;
- a request that asks for prompt logprobs prefills all of its prompt.
Free slots are then taken out of order, so a batch's slots are often not consecutive and the
attention reads their keys/values gathered rather than as a view (a few % of a forward on the
CPU here): the price of keeping what was recently used. Without prefix caching the lowest free
slot is taken and emptied, which keeps the batch's slots consecutive.

Every decoding request runs its window in every step's forward; prompts are prefilled in
chunks, `chunk` prompt tokens per step in all (earliest first), packed into the same forward, so
a long prompt delays the others by at most one chunk per step. A request whose window cannot be
made is failed here and runs in no forward.

A request alone sizes its own window. When several decode together, `choose_width` picks one
width for the adaptive rows, the one with the best expected tokens per second over all of them
(`cost`: a BatchCost, c(rows) x g(width), measured by the engine on forwards of windows only);
each adaptive row runs min(width, its own largest window), or the widest fixed window beside it
when that is wider (on a CPU, where a forward's weight reads dominate, a few more tokens cost
little). An adaptive row whose prompt lookup proposes more guesses than that then grows to take
them (up to its lookup_window), as it does alone (Request.window_row).
"""
from __future__ import annotations

import itertools
from collections import deque

from ..window_size import BatchCost, choose_width
from .request import Request
from .runner import Row
from .slot_cache import SlotCache


class Scheduler:
    def __init__(self, cache: SlotCache, chunk: int, cost: BatchCost, prefix_cache: bool = True):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.cache, self.chunk, self.cost = cache, chunk, cost
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}        # slot -> request
        self.freed = [0] * cache.slots                # when each slot was last freed (a tick)
        self.ticks = itertools.count(1)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots, each starting from the longest prefix of its
        prompt a slot holds (without prefix caching: the least recently freed, emptied); the
        requests admitted."""
        free = [s for s in range(self.cache.slots) if s not in self.running]
        admitted = []
        while self.waiting and free:
            request = self.waiting.popleft()
            request.slot = self.take(request, free)
            free.remove(request.slot)
            self.running[request.slot] = request
            admitted.append(request)
        return admitted

    def take(self, request: Request, free: list[int]) -> int:
        """The free slot `request` goes in, holding the prefix it starts from (see the module
        docstring)."""
        if not self.prefix_cache:                  # the lowest: the batch's slots stay
            self.cache.clear(min(free))            # consecutive (its keys/values a view)
            return min(free)
        oldest = min(free, key=lambda s: (self.freed[s], s))
        if request.config.prompt_logprobs:
            self.cache.clear(oldest)
            return oldest
        usable = len(request.prompt) - 1                 # the last prompt token always runs
        shared = {s: min(self.cache.shared_prefix(s, request.prompt), usable)
                  for s in range(self.cache.slots)}
        longest = max(shared.values())
        whole = [s for s in free if shared[s] == self.cache.length(s) == longest > 0]
        if whole:                                         # all it holds is this prompt's
            target, count = whole[0], longest
        else:
            target = oldest
            source = max(range(self.cache.slots), key=lambda s: (shared[s], s == target))
            count = shared[source]
            if source == target or count == 0:
                self.cache.keep(target, count)
            else:
                self.cache.copy_prefix(source, target, count)
        request.start_from(count)
        return target

    def schedule(self) -> tuple[list[tuple[Request, Row]], list[tuple[Request, Row]]]:
        """(the prompt chunks of this step, the windows of its decoding requests in slot order)
        of the running requests (`admit` first)."""
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
            for request, curve in zip(sized, curves):     # as wide as a fixed row beside it
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
        """Free a slot; what it holds stays for a later request's prefix."""
        del self.running[slot]
        self.freed[slot] = next(self.ticks)

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
