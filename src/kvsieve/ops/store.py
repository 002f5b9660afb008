"""Preallocated per-layer KV storage.

A `KVStore` holds the entries one layer keeps: keys and values ``[B, H_kv, capacity, D]`` written in place, the
logical position of every entry ``[B, H_kv, capacity]`` (the token index it came from, needed for masks, recency
and tests), and optional per-entry auxiliary tensors (scores) that move with their entries.

Why preallocate: ``DynamicLayer.update`` is a ``torch.cat`` that copies the whole layer on every decode step.
Here appends write into spare capacity, growth is geometric (amortised O(1) per token), and evictions either
gather once (``keep``) or move a single entry into the evicted slot (``evict``).

All heads of a layer store the same number of entries; which entries differs per head.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

POSITION_DTYPE = torch.int32


def _source(buffer: torch.Tensor, slot: int) -> torch.Tensor:
    """The entries at ``slot`` of ``buffer`` ``[B, H_kv, capacity, ...]``, to scatter into the same buffer. Copied out
    only when the view is dense (one batch row and one KV head, MQA, e.g. Gemma-3-270m): torch refuses a dense source
    inside its target; a strided one is read as it is (the slots written are never ``slot`` itself, or hold the same
    entry)."""
    view = buffer[:, :, slot : slot + 1]
    return view.clone() if view.is_contiguous() else view


class KVStore:
    """Keys, values, positions and auxiliary per-entry tensors of one layer, with spare capacity."""

    def __init__(self, reserve: int = 64) -> None:
        self.reserve = reserve  # spare entries allocated beyond what is needed now, for decode appends
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._aux: dict[str, torch.Tensor] = {}
        self._aux_dtypes: dict[str, torch.dtype] = {}
        self._mirror_of: KVStore | None = None  # the store this one views (shared prefill), see `mirror`

    # ----------------------------------------------------------------------------------------------- views
    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        """``[B, H_kv, length, D]`` view of the stored keys."""
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        """``[B, H_kv, length]`` logical token positions of the stored entries."""
        return self._positions[:, :, : self.length]

    def aux(self, name: str) -> torch.Tensor:
        """``[B, H_kv, length]`` view of an auxiliary per-entry tensor."""
        return self._aux[name][:, :, : self.length]

    @property
    def is_empty(self) -> bool:
        return self._keys is None

    def tensors(self) -> Iterator[torch.Tensor]:
        """The KV buffers this store holds (for memory accounting)."""
        if self._keys is not None:
            yield self._keys
            yield self._values

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def used_bytes(self) -> int:
        """Bytes of the stored K and V entries (excluding spare capacity)."""
        if self._keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # ---------------------------------------------------------------------------------------- allocation
    def add_aux(self, name: str, dtype: torch.dtype = torch.float32) -> None:
        """Track an extra per-entry tensor (zero-initialised), moved together with its entries."""
        if name in self._aux_dtypes:
            return
        self._aux_dtypes[name] = dtype
        if self._positions is not None:
            b, h, cap = self._positions.shape
            self._aux[name] = torch.zeros(b, h, cap, dtype=dtype, device=self._positions.device)

    def _allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like_keys.shape
        dv = like_values.shape[-1]
        new_keys = like_keys.new_empty(b, h, capacity, d)
        new_values = like_values.new_empty(b, h, capacity, dv)
        new_positions = torch.empty(b, h, capacity, dtype=POSITION_DTYPE, device=like_keys.device)
        new_aux = {
            n: torch.zeros(b, h, capacity, dtype=dt, device=like_keys.device) for n, dt in self._aux_dtypes.items()
        }
        if self._keys is not None and self.length:
            n = self.length
            new_keys[:, :, :n] = self._keys[:, :, :n]
            new_values[:, :, :n] = self._values[:, :, :n]
            new_positions[:, :, :n] = self._positions[:, :, :n]
            for name, t in self._aux.items():
                new_aux[name][:, :, :n] = t[:, :, :n]
        self._keys, self._values, self._positions, self._aux = new_keys, new_values, new_positions, new_aux

    def ensure_capacity(self, needed: int, like_keys: torch.Tensor, like_values: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        grown = max(needed + self.reserve, self.capacity + self.capacity // 2)
        self._allocate(like_keys, like_values, grown)

    # -------------------------------------------------------------------------------------------- writes
    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> None:
        """Append ``q`` new entries (``[B, H_kv, q, D]``) whose logical positions start at ``first_position``."""
        q = keys.shape[2]
        self.ensure_capacity(self.length + q, keys, values)
        n = self.length
        self._keys[:, :, n : n + q] = keys
        self._values[:, :, n : n + q] = values
        pos = torch.arange(first_position, first_position + q, dtype=POSITION_DTYPE, device=keys.device)
        self._positions[:, :, n : n + q] = pos
        for t in self._aux.values():
            t[:, :, n : n + q] = 0
        self.length = n + q

    def keep(self, indices: torch.Tensor, reserve: int | None = None) -> None:
        """Keep only the entries at ``indices`` (``[B, H_kv, k]``, into the stored axis), in that order.

        Reallocates to ``k + reserve`` entries so that evicted memory is really freed.
        """
        k = indices.shape[-1]
        spare = self.reserve if reserve is None else reserve
        d, dv = self._keys.shape[-1], self._values.shape[-1]
        kept_keys = self.keys.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, d))
        kept_values = self.values.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, dv))
        kept_positions = self.positions.gather(2, indices)
        kept_aux = {n: self.aux(n).gather(2, indices) for n in self._aux}
        # Drop the old buffers before allocating the new ones (lower peak memory).
        self.length = 0
        self._keys = self._values = self._positions = None
        self._aux = {}
        self._allocate(kept_keys, kept_values, k + spare)
        self._keys[:, :, :k] = kept_keys
        self._values[:, :, :k] = kept_values
        self._positions[:, :, :k] = kept_positions
        for name, t in kept_aux.items():
            self._aux[name][:, :, :k] = t
        self.length = k

    def evict(self, slots: torch.Tensor) -> None:
        """Remove one entry per (batch, head): the entry at ``slots`` (``[B, H_kv]``) is overwritten by the last
        stored entry and the length shrinks by one. Copies one entry per head instead of the whole layer, in place
        (one ``scatter_`` per buffer: a rolling method evicts in every layer at every decode step)."""
        last = self.length - 1
        index = slots.unsqueeze(-1)  # [B, H_kv, 1]
        for t in (self._positions, *self._aux.values()):
            t.scatter_(2, index, _source(t, last))
        for t in (self._keys, self._values):
            t.scatter_(2, index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]), _source(t, last))
        self.length = last

    def evict_slot(self, slot: int) -> None:
        """`evict` of the same ``slot`` in every (batch, head), known on the host: one copy per buffer and no index
        tensor (StreamingLLM's rolling window, whose victim's slot follows a ring)."""
        last = self.length - 1
        if not 0 <= slot <= last:
            raise IndexError(f"evict_slot: slot {slot} outside the {self.length} stored entries")
        if slot != last:  # distinct entries: the views do not overlap
            for t in (self._keys, self._values, self._positions, *self._aux.values()):
                t[:, :, slot].copy_(t[:, :, last])
        self.length = last

    # ------------------------------------------------------------------------------------ shared prefill
    def mirror(self, source: KVStore) -> None:
        """Become a read-only view of ``source``'s entries while keeping this store's own auxiliary tensors.

        For a shared prefill (`kvsieve.prefill_sharing`): one store holds the prompt, and every participating
        policy scores it through its own store, whose aux tensors (scores) stay private. Entries that appeared since
        the previous ``mirror`` start with zero aux values, as after `append`. Never write through a mirror: call
        `adopt` before anything that stores or evicts.
        """
        if source._keys is None:
            return
        b, h, cap = source._positions.shape
        old_length = self.length if self._mirror_of is source else 0
        self._mirror_of = source
        for name, dtype in self._aux_dtypes.items():
            old = self._aux.get(name)
            if old is None or old.shape != (b, h, cap):
                grown = torch.zeros(b, h, cap, dtype=dtype, device=source._positions.device)
                if old is not None and old_length:
                    grown[:, :, :old_length] = old[:, :, :old_length]
                self._aux[name] = grown
            self._aux[name][:, :, old_length : source.length] = 0
        self._keys, self._values, self._positions = source._keys, source._values, source._positions
        self.length = source.length

    def adopt(self, source: KVStore) -> None:
        """Hold a private copy of ``source``'s entries (with this store's spare capacity), keeping the aux values
        that this store accumulated as a `mirror` of ``source``."""
        n = source.length
        aux = {name: t[:, :, :n].clone() for name, t in self._aux.items()} if self._mirror_of is source else {}
        self._mirror_of = None
        self.length = 0
        self._keys = self._values = self._positions = None
        self._aux = {}
        if source._keys is None:
            return
        self._allocate(source.keys, source.values, n + self.reserve)
        self._keys[:, :, :n] = source.keys
        self._values[:, :, :n] = source.values
        self._positions[:, :, :n] = source.positions
        for name, t in aux.items():
            self._aux[name][:, :, :n] = t
        self.length = n

    def clone(self) -> KVStore:
        other = KVStore(self.reserve)
        other.length = self.length
        other._aux_dtypes = dict(self._aux_dtypes)
        if self._keys is not None:
            other._keys = self._keys.clone()
            other._values = self._values.clone()
            other._positions = self._positions.clone()
            other._aux = {n: t.clone() for n, t in self._aux.items()}
        return other
