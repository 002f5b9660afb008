"""InfLLM's fast window attention and block cache against the computation they replace.

* `merged_attention` (each part attended where it lies, merged through log-sum-exps) equals one softmax over the
  concatenated parts (`concatenated_reference`: the previous implementation's computation), outputs and per-key
  probability sums, with masks, GQA, one or several queries, fp32 and bf16.
* The fused kernel's path of `attend_with_lse` equals the grouped-matmul path.
* The block memory lays out exactly the blocks asked for, in order, for every batch row, from an offloaded store
  through its device cache (across evictions) or from an on-device store directly; unit-length representatives
  equal `F.normalize` of the representatives.
* In a model: InfLLM and ActQKV with the merged attention retrieve the same blocks and give the same logits as
  with the concatenated reference (swapped in for `merged_attention` at the op level).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kvsieve
from helpers import greedy_with_logits, random_ids, tiny_model, traces_of
from kvsieve.cache import SieveCache
from kvsieve.methods import infllm
from kvsieve.ops.blocks import BlockMemory
from kvsieve.ops.merged import Band, Part, attend_with_lse, attend_with_lse_matmul, merged_attention

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # fp32: rounding; bf16: the output's own rounding (~8e-3 x |v|)
SUM_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def concatenated_reference(scored, fused, scaling, fused_sums=False):
    """One softmax over every part's logits (each part with its own queries), as the previous implementation
    computed it: logits concatenated, masked, normalised together, in float32; returns what `merged_attention`
    returns."""
    parts = [*scored, *fused]
    g = parts[0].query.shape[1] // parts[0].keys.shape[1]
    logits, values = [], []
    for p in parts:
        keys = p.keys.float().repeat_interleave(g, dim=1)
        part_logits = (p.query.float() * scaling) @ keys.transpose(-1, -2)
        w, n_keys = p.query.shape[2], p.keys.shape[2]
        mask = None if p.band is None else p.band.visible(0, w, 0, n_keys, p.query.device)
        if mask is not None:
            part_logits = part_logits.masked_fill(~mask, float("-inf"))
        logits.append(part_logits)
        values.append(p.values.float().repeat_interleave(g, dim=1))
    probs = torch.cat(logits, dim=-1).softmax(dim=-1)
    out = probs @ torch.cat(values, dim=2)
    sizes = [p.keys.shape[2] for p in parts]
    sums = [chunk.sum(dim=2) for chunk in probs.split(sizes, dim=-1)]
    return out.to(parts[0].values.dtype), sums if fused_sums else sums[: len(scored)]


def random_parts(w: int, dtype: torch.dtype, seed: int = 0, b: int = 2, h: int = 6, h_kv: int = 2, d: int = 16):
    """A window of ``w`` queries: local keys with a causal band, a near-memory part whose tail each query sees more
    of (its first keys seen by all), blocks."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    n_loc, n_near, n_blk, width = w + 9, 11, 40, 8
    q_loc, q_mem = rand(b, h, w, d), rand(b, h, w, d)
    # query i is key n_loc - w + i and sees the `width` keys ending at itself
    loc_band = Band(n_loc - w - width + 1, n_loc - w + 1)
    near_band = Band(hi=7 - w // 2, floor=7)  # 7 keys seen by all; the tail from query w // 2 on, a key a query
    local = Part(q_loc, rand(b, h_kv, n_loc, d), rand(b, h_kv, n_loc, d), loc_band)
    near = Part(q_mem, rand(b, h_kv, n_near, d), rand(b, h_kv, n_near, d), near_band)
    blocks = Part(q_mem, rand(b, h_kv, n_blk, d), rand(b, h_kv, n_blk, d))
    return local, near, blocks


def test_a_band_is_the_mask_it_describes():
    """`Band.visible` against the bands written out, `Band.keys_seen` as the tightest span of visible keys, and
    `Band.edges` as the only keys of that span some query does not see, masked as `visible` masks them."""
    rows, keys = torch.arange(10)[:, None], torch.arange(15)[None, :]
    cases = [
        (Band(-3, 2), (keys >= rows - 3) & (keys < rows + 2)),
        (Band(hi=-4, floor=3), keys < (rows - 4).clamp_min(3)),
        (Band(lo=2), keys >= rows + 2),
        (Band(), torch.ones(10, 15, dtype=torch.bool)),
        (Band(-1, 1), (keys >= rows - 1) & (keys < rows + 1)),  # narrower than a tile: its two sides meet
        (Band(2, 9, floor=4), (keys >= rows + 2) & (keys < (rows + 9).clamp_min(4))),
        (Band(hi=-4), keys < rows - 4),  # rows 0-4 see nothing
    ]
    for band, dense in cases:
        for r0, r1 in ((0, 10), (0, 4), (3, 7), (9, 10)):
            got = band.visible(r0, r1, 0, 15, "cpu")
            want = dense[r0:r1]
            assert torch.equal(torch.ones_like(want) if got is None else got, want)
            k0, k1 = band.keys_seen(r0, r1, 15)
            seen = want.any(dim=0).nonzero().flatten()
            if not len(seen):  # a tile that sees none of the part's keys has an empty span
                assert k1 <= k0
                continue
            assert (k0, k1) == (seen.min().item(), seen.max().item() + 1)
            # within the span the mask is the dense one's columns
            tile = band.visible(r0, r1, k0, k1, "cpu")
            assert torch.equal(torch.ones_like(want[:, k0:k1]) if tile is None else tile, want[:, k0:k1])
            from_edges = torch.ones_like(want[:, k0:k1])
            for edge in band.edges(r0, r1, k0, k1, "cpu"):
                assert k0 <= edge.start < edge.stop <= k1
                assert torch.equal(edge.seen, (~edge.hidden).float())
                from_edges[:, edge.start - k0 : edge.stop - k0] = ~edge.hidden
            assert torch.equal(from_edges, want[:, k0:k1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w, query_tile", [(1, 64), (7, 64), (32, 64), (32, 5), (23, 1)])
@pytest.mark.parametrize("blocks_scored", [False, True])
def test_merged_attention_equals_one_softmax_over_the_concatenated_parts(dtype, w, query_tile, blocks_scored):
    """Tiles of 5 and 1 queries: tiles where the near part's tail is unseen, partly seen, and seen by all."""
    local, near, blocks = random_parts(w, dtype, seed=w)
    scored, fused = ([local, near, blocks], []) if blocks_scored else ([local, near], [blocks])
    out, sums = merged_attention(scored, fused, 0.25, fused_sums=True, query_tile=query_tile)
    ref_out, ref_sums = concatenated_reference([*scored, *fused], [], 0.25)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert (out.float() - ref_out.float()).abs().max().item() < TOL[dtype]
    if not blocks_scored:  # the fused part's sums do not change the output
        assert torch.equal(out, merged_attention(scored, fused, 0.25, query_tile=query_tile)[0])
    assert len(sums) == 3
    for got, want in zip(sums, ref_sums):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() < SUM_TOL[dtype] * max(1.0, w / 4)


def test_merged_attention_is_sharp():
    """The check above fails on a wrong merge: dropping the fused part's weight changes the output."""
    local, near, blocks = random_parts(7, torch.float32)
    out, _ = merged_attention([local, near], [blocks], 0.25)
    without, _ = concatenated_reference([local, near], [], 0.25)
    assert (out - without).abs().max().item() > 1e-2


def test_a_scored_part_without_keys_is_refused():
    local, near, _ = random_parts(3, torch.float32)
    empty = Part(near.query, near.keys[:, :, :0], near.values[:, :, :0])
    for scored, fused in (([local, empty], []), ([local], [empty])):
        with pytest.raises(ValueError, match="no keys"):
            merged_attention(scored, fused, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w", [1, 5, 64])
def test_fused_kernel_equals_grouped_matmuls(dtype, w):
    _, _, blocks = random_parts(w, dtype, seed=3)
    out, lse = attend_with_lse(blocks.query, blocks.keys, blocks.values, 0.3)
    ref_out, ref_lse = attend_with_lse_matmul(blocks.query, blocks.keys, blocks.values, 0.3)
    assert out.shape == ref_out.shape == blocks.query.shape and lse.shape == (*blocks.query.shape[:3], 1)
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert (out.float() - ref_out.float()).abs().max().item() < TOL[dtype]
    assert (lse - ref_lse).abs().max().item() < TOL[dtype] * 10


def _memory(n_blocks: int, offload: bool, batch: int = 2, h_kv: int = 2, bs: int = 4, d: int = 8) -> BlockMemory:
    """A block memory of ``n_blocks`` distinct blocks; ``offload``: in host memory behind a 4-block device cache,
    else read from the store directly (as on a CPU model)."""
    memory = BlockMemory(block_size=bs, capacity=4, device=torch.device("cpu"), offload=offload)
    for j in range(n_blocks):
        keys = torch.arange(batch * h_kv * bs * d, dtype=torch.float32).view(batch, h_kv, bs, d) + 1000 * j
        memory.add(keys, -keys, torch.zeros(batch, h_kv * d), bs * j)
    return memory


@pytest.mark.parametrize("offload", [True, False])
def test_block_memory_lays_out_the_selected_blocks_for_every_row_copying_only_new_ones(offload):
    memory = _memory(9, offload)
    selections = ([[0, 1, 2], [5, 3, 8]], [[7, 1], [8, 2]], [[4, 6, 0, 3], [1, 0, 8, 5]], [[2, 5], [6, 7]])
    selections += ([[2, 5], [6, 7]], [[5, 2, 3], [7, 6, 1]])  # the same blocks again, then one more per row
    copies = []
    for selection in selections:
        before = memory.buffer.copies
        keys, values, order = memory.fetch(torch.tensor(selection))
        copies.append(memory.buffer.copies - before)
        for row, blocks in enumerate(selection):
            assert sorted(order[row]) == sorted(blocks)  # every selected block once, in some place
            want_k = torch.cat([memory.store.block(row, j)[0] for j in order[row]], dim=1)  # [H_kv, k * bs, D]
            want_v = torch.cat([memory.store.block(row, j)[1] for j in order[row]], dim=1)
            assert torch.equal(keys[row], want_k) and torch.equal(values[row], want_v)
        assert keys.data_ptr() == memory.buffer._k.data_ptr()  # a view of the buffer, not a copy
        if offload:
            assert max(memory.cache.occupied()) <= 4 and memory.cache.allocated_slots <= 4
    if offload:
        assert memory.cache.loads + memory.cache.hits == 32 and memory.cache.hits > 0  # each selected block once
    else:
        assert memory.cache is None and memory.store.device.type == "cpu" and memory.store.block_dim == 2
    # a block that stays selected within the step's places keeps its place: [0, 1, 2] -> [7, 1] keeps 1 (place 1),
    # [5, 3, 8] -> [8, 2] copies both (8 was at place 2, beyond 2 places); [8, 2] -> [1, 0, 8, 5] keeps 8; the
    # repeated step copies nothing; the last adds one block per row
    assert copies == [6, 3, 7, 4, 0, 2]


def test_the_buffer_views_only_the_store_slots_it_reads_across_a_growth_and_a_copy():
    """An on-device store holds every block: the attended buffer makes a source slot's views when a step first
    reads it, not views of every slot (the first step after a growth or a `Driver.copy` made them all: 165 ms at
    16K on the 0.5B model). Blocks laid out after the store grows (a new tensor) and in a deep copy are the
    store's own."""

    def views_made(memory: BlockMemory) -> list[int]:
        return [sum(v is not None for v in views_k) for views_k, _ in memory.buffer._source_views]

    def check(memory: BlockMemory, selection: list[list[int]]) -> None:
        keys, values, order = memory.fetch(torch.tensor(selection))
        for row in range(2):
            want_k = torch.cat([memory.store.block(row, j)[0] for j in order[row]], dim=1)
            want_v = torch.cat([memory.store.block(row, j)[1] for j in order[row]], dim=1)
            assert torch.equal(keys[row], want_k) and torch.equal(values[row], want_v)

    memory = _memory(9, offload=False)  # 9 blocks in a store of 16 slots
    check(memory, [[0, 1], [5, 3]])
    assert views_made(memory) == [2, 2] and len(memory.buffer._source_views[0][0]) == 16
    check(memory, [[0, 2], [5, 8]])  # one new block per row
    assert views_made(memory) == [3, 3]
    for j in range(9, 17):  # the 17th block grows the store: a new tensor, so new (lazy) views
        keys = torch.full((2, 2, 4, 8), float(j))
        memory.add(keys, -keys, torch.zeros(2, 16), 4 * j)
    check(memory, [[16, 2], [9, 8]])
    assert views_made(memory) == [1, 1]  # the block that moved in (the others kept their places)
    twin = copy.deepcopy(memory)
    check(twin, [[16, 11], [9, 5]])
    assert twin.buffer._source_views[0][0][11] is not None and memory.buffer._source_views[0][0][11] is None
    check(memory, [[16, 11], [9, 5]])  # the original reads its own store


@pytest.mark.parametrize("offload", [True, False])
def test_block_memory_lays_a_head_and_a_tail_around_the_blocks(offload):
    """``[head ; blocks ; tail]`` per row (InfLLM's init tokens and remainder around the retrieved blocks): right
    after the buffer grows for a longer head or tail (placed blocks keep their places), and when a step with fewer
    blocks writes its tail over a place that a later step needs again."""
    memory = _memory(6, offload)

    def near(n: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.arange(2 * 2 * n * 8, dtype=torch.float32).view(2, 2, n, 8) + base
        return keys, -keys

    def check(selection, head, tail, copies):
        before = memory.buffer.copies
        keys, values, order = memory.fetch(torch.tensor(selection), head, tail)
        assert memory.buffer.copies - before == copies
        for row in range(2):
            blocks = [memory.store.block(row, j) for j in order[row]]
            want_k = torch.cat([head[0][row], *(k for k, _ in blocks), tail[0][row]], dim=1)
            want_v = torch.cat([head[1][row], *(v for _, v in blocks), tail[1][row]], dim=1)
            assert torch.equal(keys[row], want_k) and torch.equal(values[row], want_v)

    check([[0, 1], [2, 3]], near(2, 0.5), near(1, 0.25), copies=4)
    check([[0, 1], [2, 3]], near(3, 0.5), near(3, 0.75), copies=0)  # longer head and tail: the buffer grows
    check([[1], [3]], near(3, 0.5), near(2, 0.125), copies=2)  # one block: 1 and 3 move to place 0, the tail after
    check([[1, 4], [3, 5]], near(3, 0.5), near(2, 0.375), copies=2)  # place 1 held the tail: copied in again


@pytest.mark.parametrize("offload", [True, False])
def test_a_tail_with_its_first_position_is_written_only_where_it_is_new(offload):
    """InfLLM's remainder at decode: it grows by a token a step from the same first position, so only the new
    entries are copied -- unless the blocks' count moved the tail, the buffer grew, or the tail starts elsewhere.
    Each step hands the tail with the entries it should not copy replaced by NaN: the result must still be the
    true ``[head ; blocks ; tail]`` (a needless copy brings a NaN in, a missing one leaves a stale entry)."""
    memory = _memory(6, offload)
    keys = torch.randn(2, 2, 16, 8)
    head = (torch.ones(2, 2, 3, 8), -torch.ones(2, 2, 3, 8))
    two = [[0, 1], [2, 3]]
    # (selection, tail's first position, its length, entries to copy); the tail's room: a block (4), then doubled
    steps = [(two, 0, 2, 2), (two, 0, 3, 1), (two, 0, 5, 5), ([[0, 1, 4], [2, 3, 5]], 0, 6, 6), (two, 0, 7, 7)]
    steps += [(two, 4, 2, 2), (two, 4, 3, 1), (two, 4, 3, 0), (two, 4, 8, 5), (two, 4, 9, 9)]
    for selection, first, n, new in steps:
        tail = (keys[:, :, first : first + n], -keys[:, :, first : first + n])
        handed = tuple(t.clone() for t in tail)
        for t in handed:
            t[:, :, : n - new] = float("nan")
        got_k, got_v, order = memory.fetch(torch.tensor(selection), head, handed, first)
        for row in range(2):
            blocks = [memory.store.block(row, j) for j in order[row]]
            want_k = torch.cat([head[0][row], *(k for k, _ in blocks), tail[0][row]], dim=1)
            want_v = torch.cat([head[1][row], *(v for _, v in blocks), tail[1][row]], dim=1)
            assert torch.equal(got_k[row], want_k) and torch.equal(got_v[row], want_v), (selection, first, n)


@pytest.mark.parametrize("offload", [True, False])
def test_a_tail_laid_out_ahead_is_attended_as_it_grows_without_being_written_again(offload):
    """A decode step's remainder with the next tokens' keys derived already: the tail is handed longer than the part
    attended (``tail_len``), laid out once, and the steps after it attend more of it without copying anything
    until the tail handed grows past what was laid out. Entries a call must not copy are handed as NaN."""
    memory = _memory(6, offload)
    keys = torch.randn(2, 2, 16, 8)
    head = (torch.ones(2, 2, 3, 8), -torch.ones(2, 2, 3, 8))
    two, three = [[0, 1], [2, 3]], [[0, 1, 4], [2, 3, 5]]
    # (selection, tail's first position, entries handed, entries attended, entries to copy); the tail's room: the
    # first tail's 5 entries, then doubled (the buffer grown: written whole), as are the places for three blocks
    steps = [(two, 0, 5, 1, 5), (two, 0, 5, 3, 0), (two, 0, 5, 5, 0), (two, 0, 8, 6, 8), (two, 0, 10, 9, 2)]
    steps += [
        (two, 0, 10, 10, 0),
        (three, 0, 10, 7, 10),
        (three, 0, 10, 10, 0),
        (three, 4, 6, 2, 6),
        (three, 4, 6, 0, 0),
    ]
    for selection, first, n, attended, new in steps:
        tail = (keys[:, :, first : first + n], -keys[:, :, first : first + n])
        handed = tuple(t.clone() for t in tail)
        for t in handed:
            t[:, :, : n - new] = float("nan")
        got_k, got_v, order = memory.fetch(torch.tensor(selection), head, handed, first, tail_len=attended)
        for row in range(2):
            blocks = [memory.store.block(row, j) for j in order[row]]
            want_k = torch.cat([head[0][row], *(k for k, _ in blocks), tail[0][row, :, :attended]], dim=1)
            want_v = torch.cat([head[1][row], *(v for _, v in blocks), tail[1][row, :, :attended]], dim=1)
            assert torch.equal(got_k[row], want_k) and torch.equal(got_v[row], want_v), (selection, first, n)
    with pytest.raises(ValueError, match="tail_len must be within the tail's 6 entries, got 7"):
        memory.fetch(torch.tensor(three), head, tail, 4, tail_len=7)


@pytest.mark.parametrize("offload", [True, False])
def test_a_tail_is_written_whole_after_a_call_that_laid_blocks_where_it_was(offload):
    """Decode steps with two blocks and a tail, then a chunk's window with three blocks (no tail): its third place
    is where the tail was, so the next step's tail, from the same first position, is copied whole (a step that
    copied only its new entry read the chunk's block as its remainder). In a model this takes a chunk after decode
    steps whose windows retrieve more blocks than the steps around it (ActQKV's counts vary by layer and step)."""
    memory = _memory(6, offload)
    keys = torch.randn(2, 2, 16, 8)
    two, three = [[0, 1], [2, 3]], [[0, 1, 4], [2, 3, 5]]
    memory.fetch(torch.tensor(three))  # places for three blocks (four, doubled): the chunk's window will not grow them
    for n, new in ((2, 2), (3, 1), (4, 4)):  # the middle step copies one entry; after the chunk, all of them
        if n == 4:  # (the tail's room, 4 entries, holds them all: no growth rewrites it)
            memory.fetch(torch.tensor(three))
        tail = (keys[:, :, :n], -keys[:, :, :n])
        handed = tuple(t.clone() for t in tail)
        for t in handed:
            t[:, :, : n - new] = float("nan")
        got_k, got_v, order = memory.fetch(torch.tensor(two), None, handed, 0)
        for row in range(2):
            blocks = [memory.store.block(row, j) for j in order[row]]
            want_k = torch.cat([*(k for k, _ in blocks), tail[0][row]], dim=1)
            want_v = torch.cat([*(v for _, v in blocks), tail[1][row]], dim=1)
            assert torch.equal(got_k[row], want_k) and torch.equal(got_v[row], want_v), n


def test_an_on_device_store_keeps_its_blocks_when_it_grows_and_counts_its_bytes_where_they_are():
    """The store grows geometrically (16 blocks, then 32): blocks written before a growth read back unchanged. In
    host memory (offloaded, or a CPU model) the store's bytes are host bytes and the device counts the blocks laid
    out for attention; the offloaded memory counts its cache's occupied slots instead."""
    for offload in (True, False):
        memory = _memory(20, offload)
        per_block = 2 * 2 * 4 * 8 * 4  # K and V of one row: H_kv x bs x D fp32
        for j in (0, 15, 16, 19):
            assert memory.store.block(1, j)[0][0, 0, 0].item() == 2 * 4 * 8 + 1000 * j  # row 1 starts at h_kv*bs*d
        assert memory.host_bytes() == 20 * 2 * per_block  # two rows
        memory.fetch(torch.tensor([[3, 17, 19], [0, 1, 2]]))
        assert memory.resident_blocks() == 3
        assert memory.device_bytes() == 3 * 2 * per_block  # the cache's slots, or the buffer's places


def test_unit_representatives_follow_the_blocks_added():
    memory = BlockMemory(block_size=4, capacity=8, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for j in range(20):
        memory.add(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.randn(1, 32, generator=gen), 4 * j)
        if j in (0, 3, 17, 19):  # asked at irregular points: only new blocks are normalised
            assert torch.allclose(memory.unit_reprs, F.normalize(memory.reprs, dim=-1), atol=1e-7)
    assert memory.unit_reprs.shape == (1, 20, 32)


def test_representatives_read_between_blocks_are_the_blocks_so_far():
    """The views `reprs` and `unit_reprs` hand out are kept between blocks: each read after a block is added
    holds that block, and reads in between return the same view."""
    memory = BlockMemory(block_size=4, capacity=8, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    added = []
    for j in range(20):
        added.append(torch.randn(1, 32, generator=gen))
        memory.add(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), added[-1], 4 * j)
        expected = torch.stack(added, dim=1)  # [1, j + 1, 32]
        assert torch.equal(memory.reprs, expected) and memory.reprs is memory.reprs
        assert torch.allclose(memory.unit_reprs, F.normalize(expected, dim=-1), atol=1e-7)
        assert memory.unit_reprs is memory.unit_reprs


SMALL = dict(n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8, repr_topk=2)


@pytest.mark.parametrize(
    "name, params",
    [
        ("infllm", SMALL),
        ("infllm", {**SMALL, "cache_strategy": "lru-s", "max_cached_block": 4}),
        ("actqkv", {**SMALL, "min_blocks": 1, "max_blocks": 5}),
        ("infllm", {"budget": 64}),
    ],
)
def test_in_a_model_the_merged_attention_equals_the_concatenated_reference(monkeypatch, name, params):
    model = tiny_model("llama")
    ctx = random_ids(120, seed=4)

    def run():
        cache = SieveCache(model, kvsieve.method(name, **params), trace=True)
        tokens, logits = greedy_with_logits(model, cache, ctx, 8, chunk_size=40)
        return tokens, logits, traces_of(cache)

    tokens, logits, traces = run()
    monkeypatch.setattr(infllm, "merged_attention", concatenated_reference)
    ref_tokens, ref_logits, ref_traces = run()
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert traces.keys() == ref_traces.keys()
    for layer in traces:  # the same entries attended, retrieved blocks included, window by window
        assert len(traces[layer]) == len(ref_traces[layer])
        assert all(torch.equal(a, r) for a, r in zip(traces[layer], ref_traces[layer]))


class _PendingTransfer:
    """Stands in for the CUDA event of an asynchronous copy: it cannot be deep-copied, as a real one cannot."""

    waited = False

    def synchronize(self) -> None:
        self.waited = True

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle 'Event' object")


def test_a_copy_of_the_device_cache_waits_for_the_pending_transfer_and_then_goes_its_own_way():
    memory = _memory(6, offload=True)
    memory.cache.capacity = 3
    memory.fetch(torch.tensor([[0, 1], [2, 3]]))
    cache = memory.cache
    pending = cache._copied = _PendingTransfer()  # a CUDA model's copy in flight (Driver.copy of InfLLM on a GPU)
    cache._staging = (torch.empty(1), torch.empty(1))
    twin_memory = copy.deepcopy(memory)
    twin = twin_memory.cache
    assert pending.waited and twin._copied is None and twin._staging is None  # its own buffers at its first copy
    assert twin.slot_of == cache.slot_of and twin.slot_of is not cache.slot_of
    for row, slots in enumerate(cache.slot_of):  # only the filled slots: the others hold garbage (NaN too)
        used = sorted(slots.values())
        assert torch.equal(twin._k[row, :, used], cache._k[row, :, used])
    assert twin._k.data_ptr() != cache._k.data_ptr()
    selection = [[4, 5], [0, 1]]  # the copy moves on; the original's blocks, stamps and buffer stay as they were
    laid_out = memory.buffer._k.clone()
    keys, _, order = twin_memory.fetch(torch.tensor(selection))
    assert torch.equal(memory.buffer._k, laid_out)  # the copy's block copies went to its own buffer
    for row in range(2):
        want = torch.cat([memory.store.block(row, j)[0] for j in order[row]], dim=1)
        assert torch.equal(keys[row], want)
    assert sorted(cache.slot_of[0]) == [0, 1] and set(twin.slot_of[0]) >= {4, 5} and cache.loads == 4
