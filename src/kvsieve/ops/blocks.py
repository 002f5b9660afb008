"""Block memory for InfLLM-style methods (InfLLM, ActQKV): recent tokens and the blocks that left them.

Per layer, the tokens a context-memory method has seen live in two places:

* `TokenBuffer` -- the tokens not yet moved to the memory: the local window plus the remainder that has left it
  but does not fill a block yet. Keys are kept exactly as the model produced them (post-RoPE), with values and a
  per-query-head score that accumulates how much attention each token received while it was local.
* `BlockMemory` -- every finished block (``block_size`` tokens, pre-RoPE keys and values), their representative
  vectors (what retrieval ranks blocks by) and positions. Where the blocks are kept (`kvsieve.ops.block_store`):
  offloaded, in a host store with a bounded device cache (InfLLM's design, for accelerators); otherwise in a store
  on the model's device (on a CPU the host memory is the device's: a cache there would only copy blocks within
  the same memory). Either way a step's blocks are laid out for attention in an `AttendedBuffer`.

Everything is per layer and per cache; nothing is global.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``D`` head dim, ``bs`` block size, ``N`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvsieve.ops.block_store import AttendedBuffer, BlockStore, CacheStrategy, DeviceBlockCache, entry_bytes, nbytes


class TokenBuffer:
    """Recent tokens of one layer with spare capacity: keys/values ``[B, H_kv, n, D]``, scores ``[B, H, n]``.

    Positions are contiguous: the live tokens are ``first_position .. first_position + length - 1``. Tokens are
    appended at the end and dropped from the front (into init tokens or blocks); dropping only advances an offset,
    and the live range is moved to the front of the buffer when an append needs room.
    """

    def __init__(self, n_heads: int, spare: int) -> None:
        self.n_heads = n_heads
        self.spare = spare
        self.first_position = 0
        self._start = 0
        self._end = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self._d: torch.Tensor | None = None  # derived keys (`derived_keys`), valid in [_start, _d_end)
        self._d_end = 0
        # the last `derived_span`: ((first index, length), (keys, values)); its views stay valid until `_reallocate`
        self._derived_span: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._entry_bytes = 0  # K and V bytes of one token over the batch and heads (measured at allocation)

    @property
    def length(self) -> int:
        return self._end - self._start

    @property
    def end_position(self) -> int:
        return self.first_position + self.length

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, self._start : self._end]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, self._start : self._end]

    @property
    def scores(self) -> torch.Tensor:
        """``[B, H, length]`` float32 accumulated local attention per query head (a view: add in place)."""
        return self._s[:, :, self._start : self._end]

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, stop - start, D]`` of live tokens ``start .. stop - 1`` (0: the first live
        token), views: one slice each, where ``keys[..., start:stop]`` takes two."""
        a, b = self._start + start, self._start + stop
        return self._k[:, :, a:b], self._v[:, :, a:b]

    def value_span(self, start: int, stop: int) -> torch.Tensor:
        """The values alone of `span`."""
        return self._v[:, :, self._start + start : self._start + stop]

    def score_span(self, start: int, stop: int) -> torch.Tensor:
        """``[B, H, stop - start]`` the scores of live tokens ``start .. stop - 1`` (a view: add in place)."""
        return self._s[:, :, self._start + start : self._start + stop]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> None:
        """Append ``[B, H_kv, q, D]`` new tokens whose first logical position is ``first_position``."""
        q = keys.shape[2]
        if self._k is None:
            self.first_position = first_position
        elif first_position != self.end_position:
            raise ValueError(
                f"tokens must arrive in order: expected position {self.end_position}, got {first_position}"
            )
        if self._end + q > self.capacity:
            self._reallocate(self.length + q, keys, values)
        self._k[:, :, self._end : self._end + q] = keys
        self._v[:, :, self._end : self._end + q] = values
        self._end += q  # their scores are 0: scores past the end are never written, and allocated as zeros

    def drop_front(self, n: int) -> None:
        if n > self.length:
            raise ValueError(f"cannot drop {n} of {self.length} tokens")
        self._start += n
        self._d_end = max(self._d_end, self._start)
        self.first_position += n

    def derived_keys(self, n: int, derive: Callable[[torch.Tensor, int], torch.Tensor], ahead: int = 0) -> torch.Tensor:
        """``derive(keys, first_position)`` of the first ``n`` live tokens, ``[B, H_kv, n, D]`` (a view, valid until
        the next `append`): each token's derived key is computed once and kept while the token stays (InfLLM's
        memory keys of the tokens that have left the window, read by every later window until they leave).
        ``ahead``: see `derive_keys`."""
        self.derive_keys(n, derive, ahead)
        return self._d[:, :, self._start : self._start + n]

    def derived_span(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Derived keys and values ``[B, H_kv, n, D]`` of the first ``n`` live tokens, whose keys `derive_keys`
        derived: views, the same ones while the first live token and ``n`` stay (a decode step's remainder with
        the tokens derived ahead: ``n`` moves once a block of steps, so most steps slice nothing)."""
        if self._d is None or not 0 <= n <= self._d_end - self._start:
            raise ValueError(f"derived_span: {n} tokens, {self._d_end - self._start} derived")
        span = (self._start, n)
        if self._derived_span is None or self._derived_span[0] != span:
            a = self._start
            self._derived_span = (span, (self._d[:, :, a : a + n], self._v[:, :, a : a + n]))
        return self._derived_span[1]

    def derive_keys(self, n: int, derive: Callable[[torch.Tensor, int], torch.Tensor], ahead: int = 0) -> int:
        """Derive the keys of the first ``n`` live tokens not derived yet -- and then also of up to ``ahead`` live
        tokens after them, in the same call (a decode step needs one more token's each step: one call serves
        ``ahead + 1`` steps); returns how many live tokens from the first have derived keys (``>= n``)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"derive_keys: n must be within the {self.length} live tokens, got {n}")
        stop = self._start + n
        if stop > self._d_end:
            until = min(self._end, stop + ahead)
            fresh = derive(self._k[:, :, self._d_end : until], self.first_position + self._d_end - self._start)
            if self._d is None:  # `_reallocate` keeps it the keys' size
                self._d = fresh.new_empty(*self._k.shape[:3], fresh.shape[-1])
            self._d[:, :, self._d_end : until] = fresh
            self._d_end = until
        return self._d_end - self._start

    def shrink(self) -> None:
        """Release spare capacity left by a long chunk (keeps ``spare`` entries for the next appends)."""
        if self._k is not None and self.capacity > 2 * (self.length + self.spare):
            self._reallocate(self.length, self._k, self._v)

    def _reallocate(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        b, h_kv, _, d = like_k.shape
        cap = needed + self.spare
        k = like_k.new_empty(b, h_kv, cap, d)
        v = like_v.new_empty(b, h_kv, cap, like_v.shape[-1])
        s = torch.zeros(b, self.n_heads, cap, dtype=torch.float32, device=like_k.device)
        n = self.length
        if self._k is not None and n:
            k[:, :, :n] = self.keys
            v[:, :, :n] = self.values
            s[:, :, :n] = self.scores
        derived = self._d_end - self._start
        if self._d is not None and derived:
            d_new = self._d.new_empty(*k.shape[:3], self._d.shape[-1])
            d_new[:, :, :derived] = self._d[:, :, self._start : self._d_end]
            self._d = d_new
        else:
            self._d = None
        self._k, self._v, self._s = k, v, s
        self._start, self._end, self._d_end = 0, n, derived
        self._derived_span = None  # views of the old tensors
        self._entry_bytes = entry_bytes(k, 2) + entry_bytes(v, 2)

    def used_bytes(self) -> int:
        return self._entry_bytes * self.length  # accounting runs every step: the per-token bytes are kept

    def allocated_bytes(self) -> int:
        return nbytes(self._k) + nbytes(self._v)


class BlockMemory:
    """The blocks that have left a layer's local window: their store, the device cache when offloaded, the attended
    buffer, representative vectors.

    Block ``j`` holds the tokens at positions ``first[j] .. first[j] + bs - 1`` (pre-RoPE keys, values) of every
    batch row; ``reprs`` ``[B, N, H * D]`` (on the device) is what retrieval scores blocks against. ``offload``: the
    store in host memory and at most ``capacity`` blocks per row on ``device`` (`DeviceBlockCache`); otherwise the
    store on ``device``, read by the attended buffer directly.
    """

    def __init__(
        self,
        block_size: int,
        capacity: int,
        device: torch.device,
        strategy: CacheStrategy = "lru",
        decay: float = 0.1,
        offload: bool = True,
    ) -> None:
        self.block_size = block_size
        self.device = device
        pin = offload and device.type == "cuda" and torch.cuda.is_available()
        self.store = BlockStore(device, offloaded=offload, pin=pin)
        self.cache = DeviceBlockCache(capacity, strategy, decay) if offload else None
        self.buffer = AttendedBuffer(capacity)
        self._reprs: torch.Tensor | None = None
        # the live views of the representatives and of their unit-length copies, kept until the next block: a
        # decode step reads one every layer, and a slice is a dispatch (blocks come every block_size steps)
        self._reprs_view: torch.Tensor | None = None
        self._unit_view: torch.Tensor | None = None
        self._first: list[int] = []  # the first position of each block
        self._unit: torch.Tensor | None = None  # [B, capacity, H * D] the representatives at unit length
        self._unit_done = 0  # blocks normalised into _unit so far

    @property
    def n_blocks(self) -> int:
        return self.store.n_blocks

    @property
    def reprs(self) -> torch.Tensor:
        """``[B, N, H * D]`` representative vectors of the blocks (float32, on the device)."""
        if self._reprs_view is None:
            self._reprs_view = self._reprs[:, : self.n_blocks]
        return self._reprs_view

    @property
    def unit_reprs(self) -> torch.Tensor:
        """``[B, N, H * D]`` the representative vectors scaled to unit length (cosine retrieval), normalised once
        per block: the blocks added since the last call are normalised and appended."""
        if self._unit_view is not None:
            return self._unit_view
        n, done = self.n_blocks, self._unit_done
        if self._unit is None or self._unit.shape[1] < n:  # as large as the representatives' buffer
            grown = torch.empty_like(self._reprs)
            if done:
                grown[:, :done] = self._unit[:, :done]
            self._unit = grown
        if done < n:
            self._unit[:, done:n] = F.normalize(self._reprs[:, done:n], dim=-1)
            self._unit_done = n
        self._unit_view = self._unit[:, :n]
        return self._unit_view

    def add(self, keys: torch.Tensor, values: torch.Tensor, representative: torch.Tensor, first_position: int) -> None:
        """Store a block: pre-RoPE keys and values ``[B, H_kv, bs, D]``, its representative vector ``[B, H * D]``."""
        n = self.n_blocks
        if self._reprs is None or n == self._reprs.shape[1]:
            cap = max(16, 2 * n)
            grown = torch.empty(representative.shape[0], cap, representative.shape[1], device=self.device)
            if n:
                grown[:, :n] = self._reprs[:, :n]
            self._reprs = grown
        self._reprs[:, n] = representative.float()
        self._reprs_view = self._unit_view = None  # one block more
        self._first.append(first_position)
        self.store.append(keys, values)

    def fetch(
        self,
        selection: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail_first: int | None = None,
        tail_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Keys and values ``[B, H_kv, k * bs, D]`` of the selected blocks ``[B, k]``, and per row the block of each
        of the ``k`` places: the order of the keys (see `AttendedBuffer.gather`; `positions` gives theirs). With
        ``head`` / ``tail``, the keys and values are ``[head ; blocks ; tail]``; ``tail_first``: the tail's first
        logical position (`AttendedBuffer.gather` then writes only its new entries); ``tail_len``: the tail's entries
        attended (the rest are laid out for later calls, see `AttendedBuffer.gather`)."""
        chosen = selection.tolist()
        if self.cache is None:  # on the device already: block j in slot j
            return self.buffer.gather(self.store.slots, chosen, chosen, head, tail, tail_first, tail_len)
        slots = self.cache.load(chosen, self.store, self.device)
        return self.buffer.gather(self.cache.slots, slots, chosen, head, tail, tail_first, tail_len)

    def credit(self, selection: list[list[int]], mass: torch.Tensor) -> None:
        """The attention mass ``[B, k]`` the blocks of ``selection`` received (the device cache's ``"lru-s"``)."""
        if self.cache is not None:
            self.cache.credit(selection, mass)

    def resident_blocks(self) -> int:
        """Blocks of the fullest row that `device_bytes` counts."""
        if self.cache is not None:
            return max(self.cache.occupied(), default=0)
        if self.store.on_host:
            return max((len(row) for row in self.buffer.placed), default=0)
        return self.store.n_blocks

    def device_bytes(self) -> int:
        """K/V bytes of the blocks on the device: the occupied cache slots, the on-device store, or -- with the
        store in host memory and no cache (a CPU model) -- the blocks laid out in the attended buffer."""
        if self.cache is not None:
            return self.cache.used_bytes()
        return self.buffer.used_bytes() if self.store.on_host else self.store.used_bytes()

    def host_bytes(self) -> int:
        """K/V bytes of the blocks in host memory: the store, when it is there."""
        return self.store.used_bytes() if self.store.on_host else 0

    def allocated_bytes(self) -> int:
        """Device bytes allocated for blocks: cache slots and attended buffer, or on-device store and buffer."""
        store = 0 if self.store.on_host else self.store.allocated_bytes()
        cache = 0 if self.cache is None else self.cache.allocated_bytes()
        return store + cache + self.buffer.allocated_bytes()

    def positions(self, order: list[list[int]]) -> torch.Tensor:
        """The positions ``[B, k * bs]`` of the keys of blocks laid out in ``order`` (`fetch`)."""
        bs, first = self.block_size, self._first
        return torch.tensor([[first[j] + i for j in row for i in range(bs)] for row in order], device=self.device)

    def repr_bytes(self) -> int:
        """Device bytes of the representative vectors (and of their unit-length copies, once cosine asked)."""
        return 0 if self._reprs is None else nbytes(self.reprs) * (1 if self._unit is None else 2)
