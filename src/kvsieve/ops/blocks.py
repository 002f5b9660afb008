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

from typing import Literal

import torch

CacheStrategy = Literal["lru", "lru-s"]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


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
        self.first_position += n

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
        self._k, self._v, self._s = k, v, s
        self._start, self._end = 0, n

    def used_bytes(self) -> int:
        if self._k is None:
            return 0
        return _nbytes(self.keys) + _nbytes(self.values)

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
        return _nbytes(self._k[:, : self.n_blocks]) + _nbytes(self._v[:, : self.n_blocks])

    def allocated_bytes(self) -> int:
        return _nbytes(self._k) + _nbytes(self._v)


class DeviceBlockCache:
    """At most ``capacity`` blocks per batch row on ``device``: slots ``[B, C, H_kv, bs, D]``, C grown up to capacity.

    ``load(selection)`` makes the selected blocks resident (copying missing ones from the host store, evicting
    blocks that the selection does not need) and returns their slots; ``gather(slots)`` lays them out as keys and
    values ``[B, H_kv, k * bs, D]`` for attention. Eviction order: ``"lru"`` -- each load stamps its blocks with a
    counter; ``"lru-s"`` -- a block's score decays by ``decay`` per step and grows by the attention mass it
    receives (`credit`); the lowest stamp or score goes first.
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

    @property
    def allocated_slots(self) -> int:
        return 0 if self._k is None else self._k.shape[1]

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
        hk = host._k
        b, _, h_kv, bs, d = hk.shape
        k = torch.empty(b, new, h_kv, bs, d, dtype=hk.dtype, device=device)
        v = torch.empty(b, new, h_kv, bs, host._v.shape[-1], dtype=host._v.dtype, device=device)
        if old:
            k[:, :old] = self._k
            v[:, :old] = self._v
        self._k, self._v = k, v
        for row in self.free:
            row.extend(range(new - 1, old - 1, -1))  # pop() hands out low slots first

    def load(self, selection: list[list[int]], host: HostBlockStore, device: torch.device) -> torch.Tensor:
        """Make ``selection`` (per row, block indices) resident; returns slots ``[B, k]`` (long, on ``device``)."""
        batch = len(selection)
        self._ensure_rows(batch)
        self.counter += 1
        slots = []
        for row, blocks in enumerate(selection):
            if len(blocks) > self.capacity:
                raise ValueError(f"a step needs {len(blocks)} blocks but the device cache holds {self.capacity}")
            cached, stamp = self.slot_of[row], self.stamp[row]
            wanted = set(blocks)
            missing = [b for b in blocks if b not in cached]
            self.hits += len(blocks) - len(missing)
            excess = len(cached) + len(missing) - self.capacity
            if excess > 0:  # evict the stalest blocks this step does not use
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
                hk, hv = host.block(row, block)
                self._k[row, slot].copy_(hk, non_blocking=True)
                self._v[row, slot].copy_(hv, non_blocking=True)
                cached[block] = slot
                self.loads += 1
            for block in blocks:
                stamp[block] = float(self.counter) if self.strategy == "lru" else 0.0
            slots.append([cached[b] for b in blocks])
        return torch.tensor(slots, dtype=torch.long).view(batch, -1).to(device)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, k * bs, D]`` of the blocks in ``slots`` ``[B, k]``, in that order."""
        batch, k = slots.shape
        rows = torch.arange(batch, device=slots.device)[:, None]
        keys, values = self._k[rows, slots], self._v[rows, slots]  # [B, k, H_kv, bs, D]
        b, _, h_kv, bs, d = keys.shape
        keys = keys.permute(0, 2, 1, 3, 4).reshape(b, h_kv, k * bs, d)
        values = values.permute(0, 2, 1, 3, 4).reshape(b, h_kv, k * bs, values.shape[-1])
        return keys, values

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
        per_slot = _nbytes(self._k[0, 0]) + _nbytes(self._v[0, 0])
        return per_slot * sum(self.occupied())

    def allocated_bytes(self) -> int:
        return _nbytes(self._k) + _nbytes(self._v)


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
        self._first: torch.Tensor | None = None  # [N] first position of each block (long, on the device)

    @property
    def n_blocks(self) -> int:
        return self.host.n_blocks

    @property
    def reprs(self) -> torch.Tensor:
        """``[B, N, H * D]`` representative vectors of the blocks (float32, on the device)."""
        return self._reprs[:, : self.n_blocks]

    def add(self, keys: torch.Tensor, values: torch.Tensor, representative: torch.Tensor, first_position: int) -> None:
        """Store a block: pre-RoPE keys and values ``[B, H_kv, bs, D]``, its representative vector ``[B, H * D]``."""
        n = self.n_blocks
        if self._reprs is None or n == self._reprs.shape[1]:
            cap = max(16, 2 * n)
            grown = torch.empty(representative.shape[0], cap, representative.shape[1], device=self.device)
            first = torch.empty(cap, dtype=torch.long, device=self.device)
            if n:
                grown[:, :n] = self._reprs[:, :n]
                first[:n] = self._first[:n]
            self._reprs, self._first = grown, first
        self._reprs[:, n] = representative.float()
        self._first[n] = first_position
        self.host.append(keys, values)

    def fetch(self, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[B, H_kv, k * bs, D]`` and positions ``[B, k * bs]`` of the selected blocks ``[B, k]``."""
        chosen = selection.tolist()
        slots = self.cache.load(chosen, self.host, self.device)
        keys, values = self.cache.gather(slots)
        first = self._first[selection.to(self.device)]  # [B, k]
        offsets = torch.arange(self.block_size, device=self.device)
        positions = (first[..., None] + offsets).reshape(selection.shape[0], -1)
        return keys, values, positions

    def repr_bytes(self) -> int:
        return 0 if self._reprs is None else _nbytes(self.reprs)
