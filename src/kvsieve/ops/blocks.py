"""Block memory for InfLLM-style methods (InfLLM, ActQKV): recent tokens, a host block store, a bounded device cache.

Per layer, the tokens a context-memory method has seen live in three places:

* `TokenBuffer` -- the tokens not yet moved to the memory: the local window plus the remainder that has left it
  but does not fill a block yet. Keys are kept exactly as the model produced them (post-RoPE), with values and a
  per-query-head score that accumulates how much attention each token received while it was local.
* `HostBlockStore` -- every finished block (``block_size`` tokens, pre-RoPE keys and values) in host memory,
  pinned when the model runs on CUDA, so the store grows with the prompt without touching device memory.
* `DeviceBlockCache` -- at most ``capacity`` blocks on the model's device: the ones a step attends are copied in
  from the host when missing, and the least recently used (``"lru"``) or lowest-scored (``"lru-s"``: decayed
  attention mass) blocks not needed by the current step are evicted. On a CPU-only machine the "device" is the
  CPU, and the cache is still a separate tensor with the same bound, so the accounting is real and testable.

`BlockMemory` ties the host store, the device cache, the blocks' representative vectors (what retrieval ranks
blocks by) and their positions together. Everything is per layer and per cache; nothing is global.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``D`` head dim, ``bs`` block size, ``N`` blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

CacheStrategy = Literal["lru", "lru-s"]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def entry_bytes(t: torch.Tensor, *dims: int) -> int:
    """Bytes of one entry of ``t`` along ``dims`` (one token of a ``[B, H_kv, S, D]`` buffer along 2), from its
    shape: what a slice would measure, without building it (accounting runs every step)."""
    count = t.numel() * t.element_size()
    for dim in dims:
        count //= t.shape[dim]
    return count


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
        self._s[:, :, self._end : self._end + q] = 0
        self._end += q

    def drop_front(self, n: int) -> None:
        if n > self.length:
            raise ValueError(f"cannot drop {n} of {self.length} tokens")
        self._start += n
        self._d_end = max(self._d_end, self._start)
        self.first_position += n

    def derived_keys(self, n: int, derive: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """``derive(keys, first_position)`` of the first ``n`` live tokens, ``[B, H_kv, n, D]`` (a view, valid until
        the next `append`): each token's derived key is computed once and kept while the token stays (InfLLM's
        memory keys of the tokens that have left the window, read by every later window until they leave)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"derived_keys: {n} of {self.length} tokens")
        stop = self._start + n
        if stop > self._d_end:
            fresh = derive(self._k[:, :, self._d_end : stop], self.first_position + self._d_end - self._start)
            if self._d is None:  # `_reallocate` keeps it the keys' size
                self._d = fresh.new_empty(*self._k.shape[:3], fresh.shape[-1])
            self._d[:, :, self._d_end : stop] = fresh
            self._d_end = stop
        return self._d[:, :, self._start : stop]

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

    def used_bytes(self) -> int:
        if self._k is None:
            return 0
        return (entry_bytes(self._k, 2) + entry_bytes(self._v, 2)) * self.length

    def allocated_bytes(self) -> int:
        return _nbytes(self._k) + _nbytes(self._v)


class HostBlockStore:
    """Finished blocks in host memory: keys/values ``[B, N, H_kv, bs, D]`` (grown geometrically).

    ``pin``: allocate page-locked memory, so host-to-device copies of CUDA models can run asynchronously.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self.n_blocks = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store one block (``[B, H_kv, bs, D]``, any device); returns its index."""
        if self._k is None or self.n_blocks == self._k.shape[1]:
            self._grow(keys, values)
        self._k[:, self.n_blocks].copy_(keys)
        self._v[:, self.n_blocks].copy_(values)
        self.n_blocks += 1
        return self.n_blocks - 1

    def _grow(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        cap = max(16, 2 * (0 if self._k is None else self._k.shape[1]))
        b, h_kv, bs, d = keys.shape
        k = torch.empty(b, cap, h_kv, bs, d, dtype=keys.dtype, device="cpu", pin_memory=self.pin)
        v = torch.empty(b, cap, h_kv, bs, values.shape[-1], dtype=values.dtype, device="cpu", pin_memory=self.pin)
        if self.n_blocks:
            k[:, : self.n_blocks] = self._k[:, : self.n_blocks]
            v[:, : self.n_blocks] = self._v[:, : self.n_blocks]
        self._k, self._v = k, v

    def block(self, row: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, bs, D]`` of block ``index`` of batch row ``row`` (host views)."""
        return self._k[row, index], self._v[row, index]

    def used_bytes(self) -> int:
        if self._k is None:
            return 0
        return (entry_bytes(self._k, 1) + entry_bytes(self._v, 1)) * self.n_blocks

    def allocated_bytes(self) -> int:
        return _nbytes(self._k) + _nbytes(self._v)


class DeviceBlockCache:
    """At most ``capacity`` blocks per batch row on ``device``, head-major: slots ``[B, H_kv, C, bs, D]``, C grown
    up to capacity.

    ``load(selection)`` makes the selected blocks resident (copying missing ones from the host store, evicting
    blocks that the selection does not need) and returns their slots (host lists: where blocks go is decided on the
    host, so no index tensor makes a round trip); ``gather(slots, blocks)`` lays them out as
    keys and values ``[B, H_kv, k * bs, D]`` for attention in a persistent attended buffer where a block that stays
    selected keeps its place, so a step copies only the blocks newly selected. The missing blocks of a step, over all
    rows, move in one host gather (into a pinned staging buffer when the host store is pinned), one host-to-device
    copy (asynchronous from pinned memory) and one scatter into their slots. Eviction order: ``"lru"`` -- each load
    stamps its blocks with a counter; ``"lru-s"`` -- a block's score decays by ``decay`` per step and grows by the
    attention mass it receives (`credit`); the lowest stamp or score goes first.
    """

    def __init__(self, capacity: int, strategy: CacheStrategy = "lru", decay: float = 0.1) -> None:
        self.capacity = capacity
        self.strategy = strategy
        self.decay = decay
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.slot_of: list[dict[int, int]] = []  # per row: block -> slot
        self.stamp: list[dict[int, float]] = []  # per row: block -> recency counter or score
        self.free: list[list[int]] = []  # per row: unused allocated slots
        self.counter = 0
        self.loads = 0  # blocks copied host -> device
        self.hits = 0  # selected blocks already resident
        self._staging: tuple[torch.Tensor, torch.Tensor] | None = None  # pinned host buffers of the copies
        self._copied: torch.cuda.Event | None = None  # the last asynchronous copy out of the staging buffers
        # The attended buffer [B, H_kv, head room + places x bs + tail room, D] (see `gather`): block places between
        # a head (written when it changes) and a tail (written at every call that passes one).
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None
        self._places = 0  # block places allocated in the buffer
        self._head_room = 0
        self._tail_room = 0
        self._head_len = -1  # entries of the head written in front of the places (-1: none since the last growth)
        self.placed: list[list[int]] = []  # per row: the block in each place of the attended buffer
        self.buffer_copies = 0  # blocks copied into the attended buffer

    def __deepcopy__(self, memo: dict) -> DeviceBlockCache:
        """A copy (`Driver.copy`) without the transfer state: a CUDA event cannot be copied, so the last transfer is
        waited for instead, and the copy allocates its own pinned staging buffers at its first transfer."""
        if self._copied is not None:
            self._copied.synchronize()
        twin = DeviceBlockCache.__new__(DeviceBlockCache)
        memo[id(self)] = twin
        skip = {"_copied": None, "_staging": None}
        for name, value in vars(self).items():
            setattr(twin, name, skip[name] if name in skip else copy.deepcopy(value, memo))
        return twin

    @property
    def allocated_slots(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def occupied(self) -> list[int]:
        return [len(s) for s in self.slot_of]

    def _ensure_rows(self, batch: int) -> None:
        while len(self.slot_of) < batch:
            self.slot_of.append({})
            self.stamp.append({})
            self.free.append([])

    def _grow(self, host: HostBlockStore, device: torch.device) -> None:
        old = self.allocated_slots
        new = min(self.capacity, max(8, 2 * old))
        hk, hv = host._k, host._v
        b, _, h_kv, bs, d = hk.shape
        k = torch.empty(b, h_kv, new, bs, d, dtype=hk.dtype, device=device)
        v = torch.empty(b, h_kv, new, bs, hv.shape[-1], dtype=hv.dtype, device=device)
        if old:
            k[:, :, :old] = self._k
            v[:, :, :old] = self._v
        self._k, self._v = k, v
        for row in self.free:
            row.extend(range(new - 1, old - 1, -1))  # pop() hands out low slots first

    def load(self, selection: list[list[int]], host: HostBlockStore, device: torch.device) -> list[list[int]]:
        """Make ``selection`` (per row, block indices) resident; returns each row's slots, in its order."""
        batch = len(selection)
        self._ensure_rows(batch)
        self.counter += 1
        slots = []
        moves: list[tuple[int, int, int]] = []  # (row, block, slot) to copy in
        for row, blocks in enumerate(selection):
            if len(blocks) > self.capacity:
                raise ValueError(f"a step needs {len(blocks)} blocks but the device cache holds {self.capacity}")
            cached, stamp = self.slot_of[row], self.stamp[row]
            missing = [b for b in blocks if b not in cached]
            self.hits += len(blocks) - len(missing)
            excess = len(cached) + len(missing) - self.capacity
            if excess > 0:  # evict the stalest blocks this step does not use
                wanted = set(blocks)
                for block in sorted(cached, key=stamp.__getitem__):
                    if block in wanted:
                        continue
                    self.free[row].append(cached.pop(block))
                    del stamp[block]
                    excess -= 1
                    if excess == 0:
                        break
            for block in missing:
                if not self.free[row]:
                    self._grow(host, device)
                slot = self.free[row].pop()
                cached[block] = slot
                moves.append((row, block, slot))
            fresh = float(self.counter) if self.strategy == "lru" else 0.0
            for block in blocks:
                stamp[block] = fresh
            slots.append([cached[b] for b in blocks])
        if moves:
            self._copy_in(moves, host, device)
        return slots

    def _copy_in(self, moves: list[tuple[int, int, int]], host: HostBlockStore, device: torch.device) -> None:
        """Copy blocks from the host store into their slots: one gather, one transfer and one scatter per tensor."""
        rows, blocks, slots = (torch.tensor(column, dtype=torch.long, device=host._k.device) for column in zip(*moves))
        flat = rows * host._k.shape[1] + blocks  # index into the store viewed as [B * N, H_kv, bs, D]
        keys, values = host._k.flatten(0, 1), host._v.flatten(0, 1)
        if host.pin:  # gather into pinned memory, so the transfer is asynchronous
            if self._copied is not None:
                self._copied.synchronize()  # the previous transfer out of the staging buffers has completed
            k_out, v_out = self._staging_for(len(moves), keys, values)
            keys, values = torch.index_select(keys, 0, flat, out=k_out), torch.index_select(values, 0, flat, out=v_out)
        else:
            keys, values = keys.index_select(0, flat), values.index_select(0, flat)
        rows, slots = rows.to(device), slots.to(device)
        self._k[rows, :, slots] = keys.to(device, non_blocking=True)  # [m, H_kv, bs, D] into [B, H_kv, C, bs, D]
        self._v[rows, :, slots] = values.to(device, non_blocking=True)
        if host.pin and device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.loads += len(moves)

    def _staging_for(self, n: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._staging is None or self._staging[0].shape[0] < n:
            size = max(n, self.capacity)
            self._staging = (
                torch.empty(size, *keys.shape[1:], dtype=keys.dtype, device="cpu", pin_memory=True),
                torch.empty(size, *values.shape[1:], dtype=values.dtype, device="cpu", pin_memory=True),
            )
        return self._staging[0][:n], self._staging[1][:n]

    def gather(
        self,
        slots: list[list[int]],
        blocks: list[list[int]],
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Keys and values ``[B, H_kv, k * bs, D]`` of ``blocks`` (per row, the same count ``k``) resident in
        ``slots`` (`load`), and per row the block of each of their ``k`` places.

        The blocks are laid out in a persistent attended buffer, head-major like the slots: a block that stays
        selected keeps its place, and only newly selected blocks are copied in (one indexed copy per tensor for the
        step), so a decode whose selection barely changes copies nothing. The places follow the buffer, not
        ``blocks``' order: attention is the same in any order of its keys (one softmax; the memory's keys share one
        position), up to float rounding.

        ``head`` and ``tail`` (keys and values ``[B, H_kv, n, D]``) are laid out on either side of the blocks, and
        the keys and values returned are ``[head ; blocks ; tail]``: one contiguous run per head that one query
        attends as one part (InfLLM's init tokens and remainder around its retrieved blocks). The head is copied
        only when its length changes (it must only grow: init tokens), the tail at every call."""
        b, k = len(slots), len(slots[0])
        n_head = 0 if head is None else head[0].shape[2]
        n_tail = 0 if tail is None else tail[0].shape[2]
        if self._buf_k is None or self._places < k or self._head_room < n_head or self._tail_room < n_tail:
            self._grow_buffer(k, n_head, n_tail)
        h_kv, bs = self._k.shape[1], self._k.shape[3]
        start, stop = self._head_room, self._head_room + self._places * bs
        for row, (wanted, row_slots) in enumerate(zip(blocks, slots)):
            placed = self.placed[row]
            del placed[k:]  # places beyond this step's count are not attended: their blocks must move in again
            placed.extend([-1] * (k - len(placed)))
            slot_of = dict(zip(wanted, row_slots))
            kept = {block for block in placed if block in slot_of}
            incoming = (block for block in wanted if block not in kept)
            places, sources = [], []
            for place, block in enumerate(placed):
                if block not in kept:
                    placed[place] = new = next(incoming)
                    places.append(place)
                    sources.append(slot_of[new])
            if places:  # per row: an index_copy_ along the places is several times faster than an index_put
                places_t, sources_t = (
                    torch.tensor(c, dtype=torch.long, device=self._k.device) for c in (places, sources)
                )
                for buf, resident in ((self._buf_k, self._k), (self._buf_v, self._v)):
                    row_places = buf[row, :, start:stop].view(h_kv, self._places, bs, buf.shape[-1])
                    row_places.index_copy_(1, places_t, resident[row].index_select(1, sources_t))
                self.buffer_copies += len(places)
        first, last = start, start + k * bs  # views: one head's places are adjacent
        if head is not None:
            first = start - n_head
            if n_head != self._head_len:
                self._buf_k[:, :, first:start] = head[0]
                self._buf_v[:, :, first:start] = head[1]
                self._head_len = n_head
        if tail is not None:
            self._buf_k[:, :, last : last + n_tail] = tail[0]
            self._buf_v[:, :, last : last + n_tail] = tail[1]
            last += n_tail
        return self._buf_k[:, :, first:last], self._buf_v[:, :, first:last], [row[:k] for row in self.placed[:b]]

    def _grow_buffer(self, k: int, n_head: int, n_tail: int) -> None:
        """Room for ``k`` places, a head of ``n_head`` and a tail of ``n_tail`` entries; placed blocks keep their
        places (copied over), the head is written again at its next call."""
        b, h_kv, _, bs, d = self._k.shape
        places = min(self.capacity, max(k, 2 * self._places)) if k > self._places else self._places
        head_room, tail_room = max(n_head, self._head_room), max(n_tail, self._tail_room)
        size = head_room + places * bs + tail_room
        buf_k = self._k.new_empty(b, h_kv, size, d)
        buf_v = self._v.new_empty(b, h_kv, size, self._v.shape[4])
        if self._buf_k is not None:
            n = self._places * bs
            buf_k[:, :, head_room : head_room + n] = self._buf_k[:, :, self._head_room : self._head_room + n]
            buf_v[:, :, head_room : head_room + n] = self._buf_v[:, :, self._head_room : self._head_room + n]
        self._buf_k, self._buf_v = buf_k, buf_v
        self._places, self._head_room, self._tail_room, self._head_len = places, head_room, tail_room, -1
        while len(self.placed) < b:
            self.placed.append([])

    def credit(self, selection: list[list[int]], mass: torch.Tensor) -> None:
        """``"lru-s"``: decay every resident block's score, then add the attention mass ``[B, k]`` each received."""
        if self.strategy != "lru-s":
            return
        mass = mass.tolist()
        for row, blocks in enumerate(selection):
            stamp = self.stamp[row]
            for block in stamp:
                stamp[block] *= self.decay
            for block, m in zip(blocks, mass[row]):
                stamp[block] += m

    def used_bytes(self) -> int:
        """Bytes of the occupied slots (K and V) over all rows."""
        if self._k is None:
            return 0
        return (entry_bytes(self._k, 0, 2) + entry_bytes(self._v, 0, 2)) * sum(self.occupied())

    def allocated_bytes(self) -> int:
        """The slots and the attended buffer (K and V)."""
        return _nbytes(self._k) + _nbytes(self._v) + _nbytes(self._buf_k) + _nbytes(self._buf_v)


class BlockMemory:
    """The blocks that have left a layer's local window: host store, device cache, representative vectors.

    Block ``j`` holds the tokens at positions ``first[j] .. first[j] + bs - 1`` (pre-RoPE keys, values) of every
    batch row; ``reprs`` ``[B, N, H * D]`` (on the device) is what retrieval scores blocks against.
    """

    def __init__(
        self,
        block_size: int,
        capacity: int,
        device: torch.device,
        strategy: CacheStrategy = "lru",
        decay: float = 0.1,
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.host = HostBlockStore(pin=device.type == "cuda" and torch.cuda.is_available())
        self.cache = DeviceBlockCache(capacity, strategy, decay)
        self._reprs: torch.Tensor | None = None
        self._first: list[int] = []  # the first position of each block
        self._unit: torch.Tensor | None = None  # [B, capacity, H * D] the representatives at unit length
        self._unit_done = 0  # blocks normalised into _unit so far

    @property
    def n_blocks(self) -> int:
        return self.host.n_blocks

    @property
    def reprs(self) -> torch.Tensor:
        """``[B, N, H * D]`` representative vectors of the blocks (float32, on the device)."""
        return self._reprs[:, : self.n_blocks]

    @property
    def unit_reprs(self) -> torch.Tensor:
        """``[B, N, H * D]`` the representative vectors scaled to unit length (cosine retrieval), normalised once
        per block: the blocks added since the last call are normalised and appended."""
        n, done = self.n_blocks, self._unit_done
        if self._unit is None or self._unit.shape[1] < n:  # as large as the representatives' buffer
            grown = torch.empty_like(self._reprs)
            if done:
                grown[:, :done] = self._unit[:, :done]
            self._unit = grown
        if done < n:
            self._unit[:, done:n] = F.normalize(self._reprs[:, done:n], dim=-1)
            self._unit_done = n
        return self._unit[:, :n]

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
        self._first.append(first_position)
        self.host.append(keys, values)

    def fetch(
        self,
        selection: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Keys and values ``[B, H_kv, k * bs, D]`` of the selected blocks ``[B, k]``, and per row the block of each
        of the ``k`` places: the order of the keys (see `DeviceBlockCache.gather`; `positions` gives theirs). With
        ``head`` / ``tail``, the keys and values are ``[head ; blocks ; tail]``."""
        chosen = selection.tolist()
        return self.cache.gather(self.cache.load(chosen, self.host, self.device), chosen, head, tail)

    def positions(self, order: list[list[int]]) -> torch.Tensor:
        """The positions ``[B, k * bs]`` of the keys of blocks laid out in ``order`` (`fetch`)."""
        bs, first = self.block_size, self._first
        return torch.tensor([[first[j] + i for j in row for i in range(bs)] for row in order], device=self.device)

    def repr_bytes(self) -> int:
        """Device bytes of the representative vectors (and of their unit-length copies, once cosine asked)."""
        return 0 if self._reprs is None else _nbytes(self.reprs) * (1 if self._unit is None else 2)
