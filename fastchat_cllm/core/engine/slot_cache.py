"""The cache owner: keys/values preallocated per slot, written at positions.

Every layer holds keys and values [slots, kv_heads, max_len, head_dim], allocated once. A slot
holds one request's sequence from position 0; its length counts the positions it holds (the
prompt and final tokens, then the window of the last forward until its rejects are trimmed).
A forward's rows write their new keys/values at their own slot's positions; rejecting guesses
only moves the slot's length back, and the next forward overwrites what lies beyond it.
Storage never moves: no concatenation, no copy on rollback.

The cache also knows which token ids its positions hold (every position's keys/values are those
of the ids up to it, guesses included), so a new request can start from another sequence's
prefix: a freed slot keeps its contents until it is reused, and `copy_prefix` copies a prefix
from a slot still in use (prefix caching: a shared system prompt, the earlier turns of a chat).

It plugs into transformers as a `Cache` (the public `update(keys, values, layer_idx)` each
attention layer calls), which returns the layer's whole stores; the runner supplies the position
ids and the attention that reads each row's slot from them (runner.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin


@dataclass(frozen=True)
class Placement:
    """Where the tokens of one packed forward write: input token i (of the sequence [1, T]) goes
    to (slot[i], position[i])."""

    slot: torch.Tensor
    position: torch.Tensor


class SlotLayer(CacheLayerMixin):
    """One layer's preallocated keys/values; `update` writes a forward's rows by Placement."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("a SlotLayer is allocated when it is made")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               where: Placement | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, kv_heads, T, head_dim] of this forward's packed tokens.
        Returns the whole stores (the engine's attention reads each row's slot from them)."""
        if where is None:
            raise RuntimeError("a SlotCache is written only by the engine's runner")
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            store[where.slot, :, where.position] = new[0].transpose(0, 1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("slots have lengths of their own: ask the SlotCache")

    def get_max_length(self) -> int:
        return self.max_len


class SlotCache(Cache):
    """Keys/values of `slots` sequences of up to `max_len` positions, for every layer of `model`."""

    def __init__(self, model, slots: int, max_len: int):
        if slots < 1 or max_len < 1:
            raise ValueError(f"need slots >= 1 and max_len >= 1, got {slots}, {max_len}")
        check_full_attention(model.config.get_text_config(), max_len)
        layers, kv_heads, head_dim = kv_layout(model)
        dtype, device = next(model.parameters()).dtype, model.device
        super().__init__(layers=[SlotLayer(slots, kv_heads, max_len, head_dim, dtype, device)
                                 for _ in range(layers)])
        self.slots, self.max_len = slots, max_len
        self.ids: list[list[int]] = [[] for _ in range(slots)]   # each slot's ids, by position
        self.where: Placement | None = None     # the forward in flight
        self.planned: dict[int, list[int]] = {}  # its token ids per slot

    @staticmethod
    def bytes_for(model, slots: int, max_len: int) -> int:
        """What a SlotCache of `model` with these slots and positions allocates."""
        layers, kv_heads, head_dim = kv_layout(model)
        size = next(model.parameters()).element_size()
        return 2 * layers * slots * kv_heads * max_len * head_dim * size

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, self.where)

    def length(self, slot: int) -> int:
        return len(self.ids[slot])

    def clear(self, slot: int) -> None:
        """Empty a slot for a new sequence (its storage is overwritten as it is filled)."""
        self.keep(slot, 0)

    def trim(self, slot: int, count: int) -> None:
        """Drop the last `count` positions of a slot (rejected guesses): only its length moves."""
        if count < 0 or count > self.length(slot):
            raise ValueError(f"cannot drop {count} of {self.length(slot)} cached positions")
        self.keep(slot, self.length(slot) - count)

    def keep(self, slot: int, count: int) -> None:
        """Keep only the first `count` positions of a slot."""
        if count < 0 or count > self.length(slot):
            raise ValueError(f"cannot keep {count} of {self.length(slot)} cached positions")
        del self.ids[slot][count:]

    def shared_prefix(self, slot: int, ids: list[int]) -> int:
        """How many leading ids of `ids` the slot already holds."""
        held, count = self.ids[slot], 0
        for a, b in zip(held, ids):
            if a != b:
                break
            count += 1
        return count

    def copy_prefix(self, source: int, target: int, count: int) -> None:
        """Make `target` hold the first `count` positions of `source` (one copy per layer)."""
        if count > self.length(source):
            raise ValueError(f"slot {source} holds {self.length(source)} positions, not {count}")
        for layer in self.layers:
            for store in (layer.keys, layer.values):
                store[target, :, :count] = store[source, :, :count]
        self.ids[target] = self.ids[source][:count]

    def place(self, slots: list[int], tokens: list[list[int]]) -> Placement:
        """Plan a packed forward whose rows, in order, write the ids tokens[r] after the cached
        prefix of slots[r]; `written()` then adds them to the slots. Raises when a slot would
        overflow."""
        sizes = [len(ids) for ids in tokens]
        starts = [self.length(s) for s in slots]
        for slot, start, size in zip(slots, starts, sizes):
            if start + size > self.max_len:
                raise ValueError(f"slot {slot}: {start} + {size} positions exceed max_len "
                                 f"{self.max_len}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot may have one row in a forward, got {slots}")
        device = self.layers[0].keys.device
        sizes_t = torch.tensor(sizes)
        slot = torch.repeat_interleave(torch.tensor(slots), sizes_t)
        position = torch.repeat_interleave(torch.tensor(starts), sizes_t) + torch.cat(
            [torch.arange(size) for size in sizes])
        self.where = Placement(slot.to(device), position.to(device))
        self.planned = dict(zip(slots, tokens))
        return self.where

    def written(self) -> None:
        """The planned forward ran: its rows' tokens are now part of their slots."""
        for slot, ids in self.planned.items():
            self.ids[slot] += ids
        self.where, self.planned = None, {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest slot's length (a forward hook's view; each slot has its own)."""
        return max(self.length(s) for s in range(self.slots))

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def storage_pointers(self) -> list[int]:
        """data_ptr of every layer's keys and values (they never change)."""
        return [t.data_ptr() for layer in self.layers for t in (layer.keys, layer.values)]


def kv_layout(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of `model`'s keys and values."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            head_dim)


def check_full_attention(config, max_len: int) -> None:
    """The runner's mask is full causal attention: refuse layers it would get wrong (a sliding
    window shorter than max_len, linear attention, ...)."""
    types = getattr(config, "layer_types", None)
    kinds = set(types or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"the slot cache supports attention layers only, got {sorted(kinds)}")
    window = getattr(config, "sliding_window", None)
    unused = types and "sliding_attention" not in kinds        # layer types say no window
    if getattr(config, "use_sliding_window", True) is False or unused:
        window = None
    if window is not None and window < max_len:
        raise ValueError(f"sliding window {window} < max_len {max_len}: not supported yet")
