"""Where InfLLM-style memory blocks live: a block store, an optional bounded device cache, the attended buffer.

* `BlockStore` -- every finished block (``block_size`` tokens, pre-RoPE keys and values). Offloaded (InfLLM's
  design), it is in host memory, block-major ``[B, N, H_kv, bs, D]`` so that a block moves as one run, pinned when
  the model runs on CUDA; kept on the model's device, it is head-major ``[B, H_kv, N, bs, D]``, the layout the
  attended buffer reads.
* `DeviceBlockCache` -- with an offloaded store: at most ``capacity`` blocks on the model's device; the ones a step
  attends are copied in from the host when missing, and the least recently used (``"lru"``) or lowest-scored
  (``"lru-s"``: decayed attention mass) blocks not needed by the step are evicted.
* `AttendedBuffer` -- the step's blocks laid out contiguously per head, from the cache's slots or straight from an
  on-device store, where a block that stays selected keeps its place.

Shapes: ``B`` batch, ``H_kv`` KV heads, ``D`` head dim, ``bs`` block size, ``N`` blocks, ``C`` slots.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

CacheStrategy = Literal["lru", "lru-s"]


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def copy_without(obj: object, memo: dict, dropped: dict[str, object]) -> object:
    """A deep copy of ``obj`` whose attributes named in ``dropped`` take the given values instead of copies (state a
    copy must not share or cannot copy: a CUDA event, pinned staging buffers, views of the original's tensors)."""
    twin = type(obj).__new__(type(obj))
    memo[id(obj)] = twin
    for name, value in vars(obj).items():
        setattr(twin, name, dropped[name] if name in dropped else copy.deepcopy(value, memo))
    return twin


def entry_bytes(t: torch.Tensor, *dims: int) -> int:
    """Bytes of one entry of ``t`` along ``dims`` (one token of a ``[B, H_kv, S, D]`` buffer along 2), from its
    shape: what a slice would measure, without building it (accounting runs every step)."""
    count = t.element_size()
    for dim, size in enumerate(t.shape):
        if dim not in dims:
            count *= size  # the product of the other sizes: defined for an empty buffer too
    return count


class BlockStore:
    """Every finished block of a layer, grown geometrically.

    ``offloaded``: in host memory, ``[B, N, H_kv, bs, D]``, page-locked when ``pin`` (host-to-device copies of
    CUDA models then run asynchronously). Otherwise on ``device``, ``[B, H_kv, N, bs, D]``: `slots` are then what
    `AttendedBuffer.gather` reads, block ``j`` in slot ``j``.
    """

    def __init__(self, device: torch.device | str = "cpu", offloaded: bool = True, pin: bool = False) -> None:
        self.device = torch.device("cpu") if offloaded else torch.device(device)
        self.offloaded = offloaded
        self.pin = pin and offloaded
        self.block_dim = 1 if offloaded else 2  # the dimension of N
        # whether the store is in host memory (offloaded, or the model runs on the CPU): read by the accounting at
        # every step, where a torch.device's type costs microseconds
        self.on_host = self.device.type == "cpu"
        self.n_blocks = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store one block (``[B, H_kv, bs, D]``, any device); returns its index."""
        if self._k is None or self.n_blocks == self._k.shape[self.block_dim]:
            self._grow(keys, values)
        self._k.select(self.block_dim, self.n_blocks).copy_(keys)
        self._v.select(self.block_dim, self.n_blocks).copy_(values)
        self.n_blocks += 1
        return self.n_blocks - 1

    def _grow(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        cap = max(16, 2 * (0 if self._k is None else self._k.shape[self.block_dim]))

        def grown(like: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
            shape = list(like.shape)
            shape.insert(self.block_dim, cap)
            new = torch.empty(shape, dtype=like.dtype, device=self.device, pin_memory=self.pin)
            if self.n_blocks:
                new.narrow(self.block_dim, 0, self.n_blocks).copy_(old.narrow(self.block_dim, 0, self.n_blocks))
            return new

        self._k, self._v = grown(keys, self._k), grown(values, self._v)

    def block(self, row: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, bs, D]`` of block ``index`` of batch row ``row`` (views)."""
        return self._k[row].select(self.block_dim - 1, index), self._v[row].select(self.block_dim - 1, index)

    @property
    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An on-device store as the attended buffer's source: keys and values ``[B, H_kv, N_allocated, bs, D]``."""
        if self.offloaded:
            raise RuntimeError("an offloaded store is read through a DeviceBlockCache, not directly")
        return self._k, self._v

    def used_bytes(self) -> int:
        if self._k is None:
            return 0
        return (entry_bytes(self._k, self.block_dim) + entry_bytes(self._v, self.block_dim)) * self.n_blocks

    def allocated_bytes(self) -> int:
        return nbytes(self._k) + nbytes(self._v)


class DeviceBlockCache:
    """At most ``capacity`` blocks per batch row of an offloaded `BlockStore` on ``device``, head-major: slots
    ``[B, H_kv, C, bs, D]``, C grown up to capacity.

    ``load(selection)`` makes the selected blocks resident (copying missing ones from the host store, evicting
    blocks that the selection does not need) and returns their slots (host lists: where blocks go is decided on the
    host, so no index tensor makes a round trip). The missing blocks of a step, over all rows, move in one host
    gather (into a pinned staging buffer when the host store is pinned), one host-to-device copy (asynchronous from
    pinned memory) and one scatter into their slots. Eviction order: ``"lru"`` -- each load stamps its blocks with a
    counter; ``"lru-s"`` -- a block's score decays by ``decay`` per step and grows by the attention mass it receives
    (`credit`); the lowest stamp or score goes first.
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

    def __deepcopy__(self, memo: dict) -> DeviceBlockCache:
        """A copy (`Driver.copy`) without the transfer state: a CUDA event cannot be copied, so the last transfer is
        waited for instead, and the copy allocates its own pinned staging buffers at its first transfer."""
        if self._copied is not None:
            self._copied.synchronize()
        return copy_without(self, memo, {"_copied": None, "_staging": None})

    @property
    def allocated_slots(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, C, bs, D]``: the attended buffer's source."""
        return self._k, self._v

    def occupied(self) -> list[int]:
        return [len(s) for s in self.slot_of]

    def _ensure_rows(self, batch: int) -> None:
        while len(self.slot_of) < batch:
            self.slot_of.append({})
            self.stamp.append({})
            self.free.append([])

    def _grow(self, host: BlockStore, device: torch.device) -> None:
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

    def load(self, selection: list[list[int]], host: BlockStore, device: torch.device) -> list[list[int]]:
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

    def _copy_in(self, moves: list[tuple[int, int, int]], host: BlockStore, device: torch.device) -> None:
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
        """The slots (K and V)."""
        return nbytes(self._k) + nbytes(self._v)


class AttendedBuffer:
    """The blocks a step attends, laid out contiguously per head in a persistent buffer
    ``[B, H_kv, head room + places x bs + tail room, D]``: a block that stays selected keeps its place, so a step
    copies in only its newly selected blocks, and a decode whose selection barely changes copies nothing. At most
    ``capacity`` places.

    A step's copies are one ``torch._foreach_copy_`` per batch row, from per-block views of the source into
    per-place views of the buffer (the places' built once per allocation, a source slot's when a step first reads
    it: `_views`, `_slot_views`): one pass over the moved blocks and one dispatch, where an ``index_select`` into a
    temporary and an ``index_copy_`` into the places took two per tensor (timed against it: docs/results/speed.md,
    "Two parts per decode step")."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._places = 0  # block places allocated
        self._head_room = 0
        self._tail_room = 0
        self._head_len = -1  # entries of the head written in front of the places (-1: none since the last growth)
        self._tail_at: tuple[int, int] | None = None  # (where, first position) of the tail written last
        self._tail_len = 0  # its entries written
        self._placed_total = 0  # places in use over all rows (accounting, every step)
        self._block_bytes = 0  # K and V bytes of one block of one row
        self.placed: list[list[int]] = []  # per row: the block in each place
        self.copies = 0  # blocks copied in
        # per row, views [H_kv, bs, D] of each place (K, then V) and of the slots of the last source read so far
        # (None: not read yet), by its storage
        self._place_views: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None = None
        self._source_views: list[tuple[list[torch.Tensor | None], list[torch.Tensor | None]]] | None = None
        self._source: tuple[torch.Tensor, torch.Tensor] | None = None  # the tensors the source views are of

    def __deepcopy__(self, memo: dict) -> AttendedBuffer:
        """A copy (`Driver.copy`) without the cached views: they would be views of the original's tensors (or of
        the copy's, if the memo got there first); the copy builds its own at its next gather."""
        return copy_without(self, memo, {"_place_views": None, "_source_views": None, "_source": None})

    def _views(self, source_k: torch.Tensor, source_v: torch.Tensor) -> None:
        """Per-row views of the places (after a growth), and the source's slot views emptied (after the source
        changed: a store or cache that grew is a new tensor; a block written into allocated room is seen through
        its view, made when a step first reads it)."""
        if self._place_views is None:
            h_kv, bs, d = source_k.shape[1], source_k.shape[3], self._k.shape[-1]
            start, stop = self._head_room, self._head_room + self._places * bs
            self._place_views = [
                (
                    self._k[row, :, start:stop].view(h_kv, self._places, bs, d).unbind(1),
                    self._v[row, :, start:stop].view(h_kv, self._places, bs, self._v.shape[-1]).unbind(1),
                )
                for row in range(self._k.shape[0])
            ]
        if self._source is None or self._source[0] is not source_k or self._source[1] is not source_v:
            # a slot's views are made when a step first reads it (`_slot_views`): an on-device store holds every
            # block, and views of all its slots at once cost the first step after a growth or a copy 165 ms at 16K
            # on the 0.5B model (24 layers), where a decode step reads a few dozen slots
            slots = source_k.shape[2]
            self._source_views = [([None] * slots, [None] * slots) for _ in range(source_k.shape[0])]
            self._source = (source_k, source_v)  # a store only ever replaces its tensors (growth), never resizes them

    def _slot_views(self, row: int, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The source's views ``[H_kv, bs, D]`` of ``slots`` of batch ``row`` (K, V), made for those not read yet."""
        views_k, views_v = self._source_views[row]
        source_k, source_v = self._source
        for slot in slots:
            if views_k[slot] is None:
                views_k[slot], views_v[slot] = source_k[row, :, slot], source_v[row, :, slot]
        return [views_k[slot] for slot in slots], [views_v[slot] for slot in slots]

    def gather(
        self,
        source: tuple[torch.Tensor, torch.Tensor],
        slots: list[list[int]],
        blocks: list[list[int]],
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail: tuple[torch.Tensor, torch.Tensor] | None = None,
        tail_first: int | None = None,
        tail_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Keys and values ``[B, H_kv, k * bs, D]`` of ``blocks`` (per row, the same count ``k``), which sit in
        ``slots`` of ``source`` (keys and values ``[B, H_kv, C, bs, D]``: a device cache's slots or an on-device
        store), and per row the block of each of their ``k`` places.

        The places follow the buffer, not ``blocks``' order: attention is the same in any order of its keys (one
        softmax; the memory's keys share one position), up to float rounding.

        ``head`` and ``tail`` (keys and values ``[B, H_kv, n, D]``) are laid out on either side of the blocks, and
        the keys and values returned are ``[head ; blocks ; tail]``: one contiguous run per head that one query
        attends as one part (InfLLM's init tokens and remainder around its retrieved blocks). The head is copied
        only when its length changes (it must only grow: init tokens), the tail at every call -- or, given
        ``tail_first`` (the logical position of its first entry, whose entries never change: InfLLM's remainder),
        only its entries not yet written at the same place (a decode step adds one). ``tail_len``: of the tail's
        entries, only the first ``tail_len`` are attended; the rest are laid out after them for later calls with the
        same ``tail_first`` (InfLLM's remainder with the next tokens whose memory keys are derived already: written
        once for a block of decode steps, not a token at every step)."""
        source_k, source_v = source
        b, k = len(slots), len(slots[0])
        n_head = 0 if head is None else head[0].shape[2]
        n_tail = 0 if tail is None else tail[0].shape[2]
        if self._k is None or self._places < k or self._head_room < n_head or self._tail_room < n_tail:
            self._grow(source_k, source_v, k, n_head, n_tail)
        bs = source_k.shape[3]
        start = self._head_room
        self._views(source_k, source_v)
        for row, (wanted, row_slots) in enumerate(zip(blocks, slots)):
            placed = self.placed[row]
            del placed[k:]  # places beyond this step's count are not attended: their blocks must move in again
            placed.extend([-1] * (k - len(placed)))
            in_slots = row_slots is wanted  # an on-device store: block j in slot j
            kept = set(wanted).intersection(placed)  # set operations: a decode step keeps most of its ~50 places
            if len(kept) < k:
                incoming = [block for block in wanted if block not in kept]
                places = [place for place, block in enumerate(placed) if block not in kept]
                for place, block in zip(places, incoming):
                    placed[place] = block
                if in_slots:
                    sources = incoming
                else:
                    slot_of = dict(zip(wanted, row_slots))
                    sources = [slot_of[block] for block in incoming]
                place_k, place_v = self._place_views[row]
                from_k, from_v = self._slot_views(row, sources)
                to_k, to_v = [*map(place_k.__getitem__, places)], [*map(place_v.__getitem__, places)]
                torch._foreach_copy_(to_k + to_v, from_k + from_v)
                self.copies += len(places)
        self._placed_total = k * b
        first, last = start, start + k * bs  # views: one head's places are adjacent
        if head is not None:
            first = start - n_head
            if n_head != self._head_len:
                self._k[:, :, first:start] = head[0]
                self._v[:, :, first:start] = head[1]
                self._head_len = n_head
        if tail is not None:
            attended = n_tail if tail_len is None else tail_len
            if not 0 <= attended <= n_tail:
                raise ValueError(f"tail_len must be within the tail's {n_tail} entries, got {tail_len}")
            at = (last, tail_first) if tail_first is not None else None
            done = min(self._tail_len, n_tail) if at is not None and at == self._tail_at else 0
            if done < attended:
                self._k[:, :, last + done : last + n_tail] = tail[0][:, :, done:]
                self._v[:, :, last + done : last + n_tail] = tail[1][:, :, done:]
                self._tail_len = n_tail
            self._tail_at = at
            last += attended
        else:  # this call's places may cover where the tail was (a chunk after decode steps): write it anew next
            self._tail_at = None
        return self._k[:, :, first:last], self._v[:, :, first:last], [row[:k] for row in self.placed[:b]]

    def _grow(self, source_k: torch.Tensor, source_v: torch.Tensor, k: int, n_head: int, n_tail: int) -> None:
        """Room for ``k`` places, a head of ``n_head`` and a tail of ``n_tail`` entries; placed blocks keep their
        places (copied over), the head is written again at its next call."""
        b, h_kv, _, bs, d = source_k.shape
        places = min(self.capacity, max(k, 2 * self._places)) if k > self._places else self._places
        head_room = max(n_head, self._head_room)
        # the tail grows a token a decode step (InfLLM's remainder, up to a block): room for a block at least, then
        # doubling, so the buffer is not rebuilt at every step
        tail_room = self._tail_room if n_tail <= self._tail_room else max(n_tail, bs, 2 * self._tail_room)
        size = head_room + places * bs + tail_room
        buf_k = source_k.new_empty(b, h_kv, size, d)
        buf_v = source_v.new_empty(b, h_kv, size, source_v.shape[4])
        if self._k is not None:
            n = self._places * bs
            buf_k[:, :, head_room : head_room + n] = self._k[:, :, self._head_room : self._head_room + n]
            buf_v[:, :, head_room : head_room + n] = self._v[:, :, self._head_room : self._head_room + n]
        self._k, self._v = buf_k, buf_v
        self._places, self._head_room, self._tail_room, self._head_len = places, head_room, tail_room, -1
        self._tail_at = None  # a new buffer: the tail is written again
        self._place_views = None  # views of the old buffer
        self._block_bytes = entry_bytes(source_k, 0, 2) + entry_bytes(source_v, 0, 2)
        while len(self.placed) < b:
            self.placed.append([])

    def used_bytes(self) -> int:
        """Bytes (K and V) of the blocks in the places, over all rows."""
        return self._block_bytes * self._placed_total

    def allocated_bytes(self) -> int:
        return nbytes(self._k) + nbytes(self._v)
