"""The one place the engine calls the model: every row of a step in one packed forward.

A step's rows (prompt chunks and Jacobi windows; row r runs its tokens [n_r] after the cached
prefix of its slot, length s_r) go into the model as one sequence of sum(n_r) tokens, with no
padding: the projections and MLPs see each token once, so a prompt chunk and the windows share
one read of the weights. Position ids are s_r + column. Attention is the one part that differs
by row, and it runs in `packed_attention`, an attention function registered with transformers'
public AttentionInterface and selected (`set_attn_implementation`) only for the engine's own
forward: rows of the same length form a group (adjacent in the packed sequence), and each group
is one SDPA call over its slots' cached keys/values (a view when the slots are consecutive,
else gathered), with a mask that lets column c of row r see its slot's positions
0 .. s_r + c: the whole cached prefix, causally within its own tokens, nothing of other slots.
Logits are projected only for the columns some row asks for (a 1D `logits_to_keep`).
"""
from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..kv_cache import cache_kwarg
from .slot_cache import SlotCache

PACKED = "fastchat_cllm_packed"      # the attention implementation of the engine's forwards


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


@dataclass(frozen=True)
class Group:
    """Rows of one length `width`, adjacent in the packed sequence from token `start`: their
    slots, the key positions they read (kv_len), and the mask (True: attended) [B, 1, n, kv_len]."""

    start: int
    width: int
    slots: torch.Tensor
    first: int | None             # the slots are first .. first + B - 1 (a view), else None
    kv_len: int
    mask: torch.Tensor

    def keys(self, store: torch.Tensor) -> torch.Tensor:
        """This group's slots of a layer's store [slots, kv_heads, max_len, head_dim], up to
        kv_len: a view when they are consecutive, else a gather."""
        if self.first is not None:
            return store[self.first: self.first + len(self.slots), :, : self.kv_len]
        return store[:, :, : self.kv_len].index_select(0, self.slots)


def group_mask(starts: torch.Tensor, width: int, kv_len: int) -> torch.Tensor:
    """[B, 1, width, kv_len]: key j is seen by column c of row b when j <= starts[b] + c."""
    limit = starts[:, None] + torch.arange(width)[None, :]                  # [B, n]
    return (torch.arange(kv_len)[None, None, :] <= limit[:, :, None])[:, None]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     packing: list[Group] | None = None, **kwargs):
    """AttentionInterface function: query [1, H, T, D] of the packed sequence; key/value: the
    layer's whole stores (SlotLayer.update, already holding this forward's tokens). Returns
    [1, T, H, D]."""
    if packing is None:
        raise RuntimeError(f"the {PACKED!r} attention runs only inside the engine's forward")
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"the engine's attention does not support {unsupported}")
    heads, total, dim = query.shape[1:]
    out = query.new_empty(total, heads, dim)
    for group in packing:
        count = len(group.slots) * group.width
        q = query[0, :, group.start: group.start + count]                   # [H, B*n, D]
        q = q.unflatten(1, (len(group.slots), group.width)).transpose(0, 1)  # [B, H, n, D]
        k, v = group.keys(key), group.keys(value)
        if k.shape[1] == heads or query.device.type == "cpu":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling,
                                               enable_gqa=k.shape[1] != heads)
        else:
            o = F.scaled_dot_product_attention(q, expand_heads(k, heads), expand_heads(v, heads),
                                               attn_mask=group.mask, scale=scaling)
        out[group.start: group.start + count] = o.transpose(1, 2).reshape(count, heads, dim)
    return out[None], None


def expand_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, heads, S, D], each key/value head repeated for its query heads
    (grouped-query attention on CUDA, where SDPA's own GQA has no kernel that takes a mask; on
    the CPU its GQA is used: a forward of 8 one-token rows of SmolLM2 spent ~8 ms copying)."""
    groups = heads // kv.shape[1]
    if groups == 1:
        return kv
    return kv[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)


AttentionInterface.register(PACKED, packed_attention)


def pack(rows: list[Row], starts: list[int], device) -> tuple[list[int], list[Group]]:
    """The rows' packing order (by length, then slot: each group adjacent) and its groups."""
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r].tokens), rows[r].slot))
    groups, at = [], 0
    for width, members in itertools.groupby(order, key=lambda r: len(rows[r].tokens)):
        members = list(members)
        slots = [rows[r].slot for r in members]
        first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        begin = torch.tensor([starts[r] for r in members])
        kv_len = int(begin.max()) + width
        groups.append(Group(at, width, torch.tensor(slots, device=device), first, kv_len,
                            group_mask(begin, width, kv_len).to(device)))
        at += len(members) * width
    return order, groups


class Runner:
    """Runs a list of Rows through `model`, writing their keys/values into `cache`. The model
    belongs to the runner's thread while a forward runs (its attention implementation is
    switched for the forward)."""

    def __init__(self, model, cache: SlotCache):
        with packed_attention_of(model):
            switched = model.config._attn_implementation == PACKED
        if not switched:
            raise ValueError(f"the engine needs a model whose attention can be set through "
                             f"transformers' AttentionInterface; {type(model).__name__} "
                             f"cannot (set_attn_implementation)")
        self.model, self.cache = model, cache
        self.cache_kwarg = cache_kwarg(type(model))

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> Output:
        started = time.perf_counter()
        device = self.model.device
        starts = [self.cache.length(row.slot) for row in rows]
        order, groups = pack(rows, starts, device)
        tokens = [rows[r].tokens for r in order]
        offset, offsets = 0, {}
        for r in order:
            offsets[r] = offset
            offset += len(rows[r].tokens)
        ids = torch.tensor([[t for piece in tokens for t in piece]], device=device)     # [1, T]
        columns = sorted(offsets[r] + c for r, row in enumerate(rows) for c in row.keep) or [0]
        where = self.cache.place([rows[r].slot for r in order], tokens)
        kept = self.forward(ids, where.position[None], groups,
                            torch.tensor(columns, device=device))[0]               # [U, V]
        at = {c: i for i, c in enumerate(columns)}
        logits = [kept[[at[offsets[r] + c] for c in row.keep]].float()
                  for r, row in enumerate(rows)]
        self.cache.written()                 # last: a forward that raised committed nothing
        return Output(logits, time.perf_counter() - started)

    def forward(self, ids, positions, groups: list[Group], columns) -> torch.Tensor:
        """The model call: ids, positions [1, T], columns [U] -> logits [1, U, V]; keys/values
        written where the cache's placement says; attention by `groups`."""
        with packed_attention_of(self.model):
            out = self.model(input_ids=ids, position_ids=positions, logits_to_keep=columns,
                             use_cache=True, packing=groups, **{self.cache_kwarg: self.cache})
        return out.logits


@contextmanager
def packed_attention_of(model):
    """The model's attention is `packed_attention` inside, and what it was again after."""
    before = model.config._attn_implementation
    model.set_attn_implementation(PACKED)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
