"""The one place the engine calls the model: every row of a step in one packed forward.

A step's rows (prompt chunks and Jacobi windows; row r runs its tokens [n_r] after the cached
prefix of its slot, length s_r) go into the model as one sequence of sum(n_r) tokens, with no
padding: the projections and MLPs see each token once, so a prompt chunk and the windows share
one read of the weights. Position ids are s_r + column. Attention is the one part that differs
by row, and it runs in `packed_attention`, an attention function registered with transformers'
public AttentionInterface and selected (`set_attn_implementation`) only for the engine's own
forward: rows of the same length form a group (adjacent in the packed sequence), with a mask
that lets column c of row r see its slot's positions 0 .. s_r + c: the whole cached prefix,
causally within its own tokens, nothing of other slots. On the CPU in float32 one C++ op
(kernels/attention.cpp, via cpu_kernels) runs every group's tokens over their slots' keys and
values; elsewhere each group is one SDPA call (its slots a view when consecutive, else gathered).
Logits are projected only for the columns some row asks for (a 1D `logits_to_keep`).

The step can be compiled (`Runner(..., compile=True)`, the worker's --compile): the same forward
through torch.compile as one graph, the attention a custom op the compiler does not look into,
float32 nn.Linear weights frozen into the graph; see Runner and warm_up.
"""
from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .. import cpu_kernels
from ..kv_cache import cache_kwarg
from .slot_cache import SlotCache

log = logging.getLogger(__name__)
PACKED = "fastchat_cllm_packed"      # the attention implementation of the engine's forwards
REFUSALS = 8        # compiled steps refused in a row after which the runner stays eager


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
    slots: tuple[int, ...]
    kv_len: int
    mask: torch.Tensor

    @cached_property
    def index(self) -> torch.Tensor | None:
        """The slots on the device, for a gather; None when they are consecutive (a view)."""
        if self.slots == tuple(range(self.slots[0], self.slots[0] + len(self.slots))):
            return None
        return torch.tensor(self.slots, device=self.mask.device)

    def keys(self, store: torch.Tensor) -> torch.Tensor:
        """This group's slots of a layer's store [slots, kv_heads, max_len, head_dim], up to
        kv_len: a view when they are consecutive, else a gather."""
        if self.index is None:
            return store[self.slots[0]: self.slots[0] + len(self.slots), :, : self.kv_len]
        return store[:, :, : self.kv_len].index_select(0, self.index)


def group_mask(starts: torch.Tensor, width: int, kv_len: int) -> torch.Tensor:
    """[B, 1, width, kv_len]: key j is seen by column c of row b when j <= starts[b] + c."""
    limit = starts[:, None] + torch.arange(width)[None, :]                  # [B, n]
    return (torch.arange(kv_len)[None, None, :] <= limit[:, :, None])[:, None]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     packing: list[Group] | tuple[torch.Tensor, torch.Tensor] | None = None,
                     packed_native: bool = False, **kwargs):
    """AttentionInterface function: query [1, H, T, D] of the packed sequence; key/value: the
    layer's whole stores (SlotLayer.update, already holding this forward's tokens). Returns
    [1, T, H, D]. `packing`: the groups, or their encoding (`encode`: in a compiled step, and
    for the C++ kernel), which goes through a custom op, opaque to the compiler, so a compiled
    step is one graph whatever the groups are: `packed_native`, the C++ kernel's (cpu_kernels: float32 on the CPU, no Python
    per layer), else `fastchat_cllm::packed_attention` (SDPA per group)."""
    if packing is None:
        raise RuntimeError(f"the {PACKED!r} attention runs only inside the engine's forward")
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"the engine's attention does not support {unsupported}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(packing, tuple):
        if packed_native:
            return torch.ops.fastchat_cllm_cpu.packed_attention(query, key, value, *packing,
                                                                scale), None
        return packed_attention_op(query, key, value, *packing, scale), None
    return attend(query, key, value, packing, scale), None


def attend(query, key, value, groups: list[Group], scale: float) -> torch.Tensor:
    """Every group's rows attending to their slots: query [1, H, T, D] -> [1, T, H, D]."""
    heads, total, dim = query.shape[1:]
    out = query.new_empty(total, heads, dim)
    for group in groups:
        count = len(group.slots) * group.width
        q = query[0, :, group.start: group.start + count]                   # [H, B*n, D]
        q = q.unflatten(1, (len(group.slots), group.width)).transpose(0, 1)  # [B, H, n, D]
        k, v = group.keys(key), group.keys(value)
        if k.shape[1] == heads or query.device.type == "cpu":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale,
                                               enable_gqa=k.shape[1] != heads)
        else:
            o = F.scaled_dot_product_attention(q, expand_heads(k, heads), expand_heads(v, heads),
                                               attn_mask=group.mask, scale=scale)
        out[group.start: group.start + count] = o.transpose(1, 2).reshape(count, heads, dim)
    return out[None]


@torch.library.custom_op("fastchat_cllm::packed_attention", mutates_args=())
def packed_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        meta: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`attend` over the groups `encode` wrote into meta and mask."""
    return attend(query, key, value, decode(meta, mask), scale)


@packed_attention_op.register_fake
def _(query, key, value, meta, mask, scale):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def encode(groups: list[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups as two tensors whose sizes are all a compiled step sees of them: meta (int64,
    on the CPU: read without a device sync) [G, then start, width, rows, kv_len of each group,
    then every group's slots], and every group's mask flattened (at least as many elements as
    the step has tokens, so never 1: see run_one_token)."""
    meta = [len(groups)] + [n for g in groups for n in (g.start, g.width, len(g.slots), g.kv_len)]
    meta += [slot for g in groups for slot in g.slots]
    return torch.tensor(meta), torch.cat([g.mask.flatten() for g in groups])


def decode(meta: torch.Tensor, mask: torch.Tensor) -> list[Group]:
    """encode's groups back; every layer of a step passes the same tensors, so the last
    step's groups are kept (by the tensors' identity: the step holds them alive)."""
    if _decoded and _decoded[0] is meta and _decoded[1] is mask:
        return _decoded[2]
    groups = _decode(meta, mask)
    _decoded[:] = [meta, mask, groups]
    return groups


_decoded: list = []       # [meta, mask, groups] of the step in flight (the loop's one thread)


def _decode(meta: torch.Tensor, mask: torch.Tensor) -> list[Group]:
    values = meta.tolist()
    fields, slots = values[1: 1 + 4 * values[0]], values[1 + 4 * values[0]:]
    groups, at_slot, at_mask = [], 0, 0
    for i in range(0, len(fields), 4):
        start, width, rows, kv_len = fields[i: i + 4]
        size = rows * width * kv_len
        groups.append(Group(start, width, tuple(slots[at_slot: at_slot + rows]), kv_len,
                               mask[at_mask: at_mask + size].view(rows, 1, width, kv_len)))
        at_slot, at_mask = at_slot + rows, at_mask + size
    return groups


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
        slots = tuple(rows[r].slot for r in members)
        begin = torch.tensor([starts[r] for r in members])
        kv_len = int(begin.max()) + width
        groups.append(Group(at, width, slots, kv_len,
                               group_mask(begin, width, kv_len).to(device)))
        at += len(members) * width
    return order, groups


class CompileError(RuntimeError):
    """The step could not be compiled (no C++ compiler, a graph break, ...)."""


class Runner:
    """Runs a list of Rows through `model`, writing their keys/values into `cache`. The model
    belongs to the runner's thread while a forward runs (its attention implementation is
    switched for the forward).

    `compile=True` compiles the step (torch.compile, shapes dynamic, one graph with no break;
    float32 nn.Linear weights frozen into it: on the CPU inductor then keeps each one prepacked
    for oneDNN, which is where the time goes, see the README; GGUF blocks are not), here, at construction (a
    CompileError when it cannot): no request waits on a compile. One graph runs every step (a
    step of one token runs as two); a step it would not take (a guard fails: the model switched
    to training mode, ...) runs eagerly rather than compiling again, and is counted
    (`eager_steps`; the first is logged); after REFUSALS in a row the runner stays eager."""

    def __init__(self, model, cache: SlotCache, compile: bool = False):
        with packed_attention_of(model):
            switched = model.config._attn_implementation == PACKED
        if not switched:
            raise ValueError(f"the engine needs a model whose attention can be set through "
                             f"transformers' AttentionInterface; {type(model).__name__} "
                             f"cannot (set_attn_implementation)")
        self.model, self.cache = model, cache
        self.cache_kwarg = cache_kwarg(type(model))
        # the attention's C++ kernel where it runs (float32 on the CPU; built at first use)
        self.native = (model.device.type == "cpu" and model.dtype == torch.float32
                       and cpu_kernels.available())
        self.compiled, self.compile_seconds, self.eager_steps = None, 0.0, 0
        # float32 nn.Linear weights are frozen into the graph (inductor prepacks them for
        # oneDNN); a model whose linear layers are all GGUF blocks (ops of their own) has
        # nothing to prepack, and unfrozen its compiled graph is reused by later starts
        # (inductor's and AOTAutograd's caches refuse frozen graphs)
        self.freezes = any(type(m) is torch.nn.Linear for m in model.modules())
        self.stance, self.refused = "fail_on_recompile", 0    # refused: in a row
        if compile:
            self.run([Row(0, [0] * 5, range(2, 5))])     # eagerly first: the model's own errors
            self.cache.clear(0)                          # stay what they are
            self.compiled = torch.compile(model, dynamic=True, fullgraph=True)
            try:
                self.compile_seconds = self.warm_up()
            except Exception as error:
                first = (str(error).strip().splitlines() or [""])[0]
                raise CompileError(f"cannot compile the step: {type(error).__name__}: "
                                   f"{first}") from error

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> Output:
        if self.compiled is not None and sum(len(row.tokens) for row in rows) == 1:
            return self.run_one_token(rows[0])
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
        """The model call: ids, positions [1, T], columns [U] -> logits [1, U, V] (compiled:
        at least 2 columns, the last repeated); keys/values written where the cache's
        placement says; attention by `groups`."""
        with packed_attention_of(self.model):
            if self.compiled is None:
                out = self.model(input_ids=ids, position_ids=positions, logits_to_keep=columns,
                                 use_cache=True, packed_native=self.native,
                                 packing=encode(groups) if self.native else groups,
                                 **{self.cache_kwarg: self.cache})
            else:
                if len(columns) == 1:                  # no size 1: see encode
                    columns = columns.repeat(2)
                try:          # the guards are checked before the graph runs: nothing written
                    with torch.compiler.set_stance(self.stance):
                        out = self.compiled(input_ids=ids, position_ids=positions,
                                            logits_to_keep=columns, use_cache=True,
                                            packing=encode(groups), packed_native=self.native,
                                            **{self.cache_kwarg: self.cache})
                except RuntimeError as error:
                    if "fail_on_recompile" not in str(error):
                        raise
                    return self.refused_step(error, ids, positions, groups, columns)
                self.refused = 0
        return out.logits

    def refused_step(self, error: RuntimeError, *args) -> torch.Tensor:
        """A step the compiled graph's guards refused (before it ran: nothing was written) runs
        eagerly, counted; after REFUSALS in a row the runner stops trying the graph."""
        self.eager_steps += 1
        self.refused += 1
        if self.eager_steps == 1:
            log.warning("a step the compiled graph does not take ran eagerly: %s", error)
        with self.eagerly():
            logits = self.forward(*args)
        if self.refused >= REFUSALS:
            log.warning("%d steps in a row refused by the compiled graph: the engine runs its "
                        "step eagerly from now on", self.refused)
            self.compiled = None
        return logits

    def run_one_token(self, row: Row) -> Output:
        """A compiled step of one token runs it twice, the copy one position on, written and
        then dropped: a size of 1 would need a graph of its own (torch.compile makes it a
        constant), and that graph is slower (SmolLM2 here: 33 ms, two tokens 24)."""
        if self.cache.length(row.slot) + 2 > self.cache.max_len:    # no room: runs eagerly
            with self.eagerly():
                return self.run([row])
        out = self.run([Row(row.slot, row.tokens * 2, row.keep)])
        self.cache.trim(row.slot, 1)
        return out

    @contextmanager
    def eagerly(self):
        compiled, self.compiled = self.compiled, None
        try:
            yield
        finally:
            self.compiled = compiled

    def warm_up(self) -> float:
        """Compile the step on slot 0 (left empty after), float32 weights frozen into the graph
        (`freezes`); seconds.

        torch.compile gives sizes that are equal when it compiles one symbol, and the graph
        would then run only where they are equal again; so the warm-up's sizes differ: tokens
        5, kept columns 3, meta 6, mask 25. The cache's stores are marked static (their sizes
        never change), so no size is shared with them either. No size is 1 in any step (see
        encode, forward, run_one_token): one graph runs them all."""
        import torch._inductor.config     # (imported when used: it takes a while)

        for layer in self.cache.layers:
            torch._dynamo.mark_static(layer.keys)
            torch._dynamo.mark_static(layer.values)
        started, self.stance = time.perf_counter(), "default"
        try:
            with torch._inductor.config.patch(freezing=self.freezes):   # (not options=)
                self.run([Row(0, [0] * 5, range(2, 5))])
        finally:
            self.stance = "fail_on_recompile"     # then: a step that would compile runs eagerly
            self.cache.clear(0)
        return time.perf_counter() - started


@contextmanager
def packed_attention_of(model):
    """The model's attention is `packed_attention` inside, and what it was again after."""
    before = model.config._attn_implementation
    model.set_attn_implementation(PACKED)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
