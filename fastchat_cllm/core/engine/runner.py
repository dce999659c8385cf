"""The one place the engine calls the model: every row of a forward in one padded batch.

Row r runs its tokens [n_r] after the cached prefix of its slot (length s_r). Inputs are padded
to n = max n_r; position ids are s_r + column; the 4D mask lets column c of row r see its slot's
positions 0 .. s_r + min(c, n_r - 1): the whole cached prefix, causally within its own tokens,
nothing of other slots, nothing of padding (a padding column repeats its row's last real
column, so no row of the mask is empty). Logits are projected only for the columns some row
asks for (one column list for all rows: a 1D `logits_to_keep`, which every 5.x model takes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..kv_cache import cache_kwarg
from .slot_cache import SlotCache

PAD = 0     # any id in the vocabulary: padding columns are never read


@dataclass(frozen=True)
class Row:
    """One request's part of a forward: `tokens` after its slot's prefix; logits are kept for
    the columns in `keep` (a range within len(tokens), possibly empty)."""

    slot: int
    tokens: list[int]
    keep: range


@dataclass(frozen=True)
class Output:
    logits: list[torch.Tensor]    # per row: float32 [len(row.keep), V]
    seconds: float                # wall time of the forward (logits read back included)


def input_ids(rows: list[Row], device) -> torch.Tensor:
    """[B, n] token ids, padded with PAD."""
    width = max(len(row.tokens) for row in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
    return ids.to(device)


def last_seen(starts: torch.Tensor, sizes: torch.Tensor, width: int) -> torch.Tensor:
    """[B, n]: the last slot position each column may see (its own; padding: its row's last)."""
    cols = torch.arange(width)
    return starts[:, None] + torch.minimum(cols[None, :], sizes[:, None] - 1)


def attention_mask(limit: torch.Tensor, kv_len: int, dtype, device) -> torch.Tensor:
    """Additive mask [B, 1, n, kv_len]: 0 where key j <= limit[b, c], else the dtype's minimum."""
    seen = torch.arange(kv_len)[None, None, :] <= limit[:, :, None]            # [B, n, kv_len]
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def kept_columns(rows: list[Row]) -> list[int]:
    """The columns projected for every row (a model keeps the same ones in each row): the
    union of the rows' `keep`, or column 0 when none asks (the model projects at least one)."""
    return sorted({c for row in rows for c in row.keep}) or [0]


MASKED_ATTENTION = ("eager", "sdpa")     # attention implementations that take a 4D mask


class Runner:
    """Runs a list of Rows through `model`, writing their keys/values into `cache`."""

    def __init__(self, model, cache: SlotCache):
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention not in MASKED_ATTENTION:
            raise ValueError(f"the engine needs attention that takes a 4D mask {MASKED_ATTENTION}"
                             f", not {attention!r}: load the model with attn_implementation='sdpa'")
        self.model, self.cache = model, cache
        self.dtype = next(model.parameters()).dtype
        self.cache_kwarg = cache_kwarg(type(model))

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> Output:
        started = time.perf_counter()
        sizes = [len(row.tokens) for row in rows]
        starts = torch.tensor([self.cache.length(row.slot) for row in rows])
        ids = input_ids(rows, self.model.device)                                # [B, n]
        width = ids.shape[1]
        where = self.cache.place([row.slot for row in rows], [row.tokens for row in rows])
        limit = last_seen(starts, torch.tensor(sizes), width)                   # [B, n]
        positions = starts[:, None] + torch.arange(width)[None, :]             # [B, n]
        columns = kept_columns(rows)
        mask = attention_mask(limit, where.kv_len, self.dtype, ids.device)
        kept = self.forward(ids, positions, mask, torch.tensor(columns, device=ids.device))
        self.cache.written()
        at = {c: i for i, c in enumerate(columns)}                             # [B, U, V]
        logits = [kept[r, [at[c] for c in row.keep]].float() for r, row in enumerate(rows)]
        return Output(logits, time.perf_counter() - started)

    def forward(self, ids, positions, mask, columns) -> torch.Tensor:
        """The model call: ids, positions [B, n], mask [B, 1, n, kv_len], columns [U] ->
        logits [B, U, V]; keys/values written where the cache's placement says."""
        out = self.model(input_ids=ids, position_ids=positions.to(ids.device),
                         attention_mask=mask, logits_to_keep=columns, use_cache=True,
                         **{self.cache_kwarg: self.cache})
        return out.logits
