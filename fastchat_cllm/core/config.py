"""The one place where Jacobi decoding options and their defaults live."""
from __future__ import annotations

from dataclasses import dataclass, replace

FILLS = ("lookup", "random")


@dataclass(frozen=True)
class JacobiConfig:
    """Options of one Jacobi decoding call.

    block_size: the largest block (guess window) one forward runs; with `adaptive` the engine
        picks a size in [min_block_size, block_size] before every forward.
    fixed_blocks: the reference's block semantics: a block of `block_size` positions is iterated
        until it is a fixed point before the next block starts (trajectory collection uses it).
        Otherwise the window slides: accepted tokens leave it and fresh guesses refill it.
    fill: how positions that have no previous prediction are guessed: "lookup" continues the
        context's own bigrams (falls back to repeating), "random" draws context tokens at random
        (the reference's initial guess).
    block_cost: prior cost of one more block position relative to a 1-token forward, used by the
        adaptive controller until it has timed forwards of that size; None picks one by device.
    """

    max_new_tokens: int = 256
    block_size: int = 16
    eos_token_id: tuple[int, ...] = ()
    adaptive: bool = True
    min_block_size: int = 1
    fixed_blocks: bool = False
    fill: str = "lookup"
    block_cost: float | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id or ()))
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("block_size", self.block_size, 1, 1024)
        _check_int("min_block_size", self.min_block_size, 1, self.block_size)
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.block_cost is not None and not self.block_cost >= 0:
            raise ValueError(f"block_cost must be >= 0, got {self.block_cost!r}")

    def with_(self, **changes) -> "JacobiConfig":
        return replace(self, **changes)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
