"""One softmax over several key sets, each attended on its own and merged exactly through log-sum-exps.

InfLLM's window attends, with one softmax, to parts that each have their own queries (the model's RoPE for the
local window, the single angle of ``n_local - 1`` for the memory) and keys: concatenating them costs a copy of
every retrieved block per window and a mask over all of them. Here each part is attended where it lies and the
parts are merged: with ``m`` the largest logit of a query over all parts, ``Z = sum_parts sum_j exp(l_j - m)`` and
``out = sum_parts sum_j exp(l_j - m) v_j / Z``; a part attended by a fused kernel contributes its output ``o`` and
log-sum-exp ``L`` as ``exp(L - m) o`` to the sum and ``exp(L - m)`` to ``Z``. Equal to the concatenated softmax up to
float rounding (`tests/test_blocks_fast.py`).

Two kinds of parts:

* *scored* parts (`Part` in ``scored``): logits are materialised (a tile of queries at a time), a `Band` may
  hide entries, and the probability each key received, summed over the queries, is returned (InfLLM's
  representative scores and ``lru-s`` credit);
* *fused* parts (``fused``): every key visible to every query; attended by torch's fused CPU kernel for several
  queries (`attend_with_lse`), by two grouped matmuls for one.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads (query head ``h`` reads KV head ``h // (H / H_kv)``),
``w`` queries, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvsieve.ops.grouped import cast, grouped_logits, grouped_weighted_sum, row_logits

_FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16)
_NEG = torch.finfo(torch.float32).min  # finite: a fully masked row never makes inf - inf
# Shifted logits are raised to this before exp: torch's CPU exp is 10-100x slower on arguments whose result
# underflows (below about -87.3: masked entries, far-off keys) than on others (measured, torch 2.13, AVX512). An entry
# this far below the row's peak weighs exp(-80) ~ 2e-35 of it instead of less: far below float32 resolution of the
# sum (which is >= 1); masked entries are then zeroed exactly.
_LOWEST_EXP = -80.0
# Queries per tile of a several-query call: a tile's logits over InfLLM's ~n_local + tile local keys stay in a
# core's cache. 128 was fastest or tied in float32 and bfloat16 at both default models' head counts
# (`benchmarks/bench_window_attention.py`: 0.86x the untiled 256-query window in float32, 0.68-0.80x at 512;
# docs/results/speed.md)
QUERY_TILE = 128


class Band(NamedTuple):
    """The keys each query of a part sees: query ``i`` sees key ``t`` iff ``lo + i <= t < max(floor, hi + i)``
    (``lo`` or ``hi`` None: that side unbounded). InfLLM's local window is a band ``n_local`` wide along the
    diagonal; its near memory, every init token (``floor``) and a prefix of the remainder that grows by one key per
    query."""

    lo: int | None = None
    hi: int | None = None
    floor: int = 0

    def keys_seen(self, r0: int, r1: int, n_keys: int) -> tuple[int, int]:
        """``[k0, k1)``: the keys of ``n_keys`` that some query ``r0 .. r1 - 1`` sees (none if ``k1 <= k0``)."""
        k0 = 0 if self.lo is None else max(0, self.lo + r0)
        k1 = n_keys if self.hi is None else min(n_keys, max(self.floor, self.hi + r1 - 1))
        return k0, k1

    def visible(self, r0: int, r1: int, k0: int, k1: int, device: torch.device | str) -> torch.Tensor | None:
        """``[r1 - r0, k1 - k0]`` bool (True: visible) for queries ``r0 ..`` and keys ``k0 ..``; None if every one
        of them sees every key."""
        lo_open = self.lo is None or self.lo + r1 - 1 <= k0
        hi_open = self.hi is None or max(self.floor, self.hi + r0) >= k1
        if lo_open and hi_open:
            return None
        rows = torch.arange(r0, r1, device=device)[:, None]
        keys = torch.arange(k0, k1, device=device)[None, :]
        seen = None if self.lo is None else keys >= rows + self.lo
        if self.hi is not None:
            below = keys < (rows + self.hi).clamp_min_(self.floor)
            seen = below if seen is None else seen & below
        return seen

    def edges(self, r0: int, r1: int, k0: int, k1: int, device: torch.device | str) -> tuple[Edge, ...]:
        """The runs of keys ``k0 .. k1 - 1`` that some query ``r0 .. r1 - 1`` does not see, with their masks: at
        most two (the band's sides; one where they meet), so a tile's keys between them are never masked."""
        return _edges(self, r0, r1, k0, k1, torch.device(device))


class Edge(NamedTuple):
    """Keys ``start .. stop - 1`` of a `Band`'s side for a tile of queries, and which of them each query sees."""

    start: int
    stop: int
    hidden: torch.Tensor  # [n, stop - start] bool, True: not seen
    seen: torch.Tensor  # the same as float 1 / 0 (a multiply costs less than a masked fill)


@functools.lru_cache(maxsize=128)  # a window's tiles repeat in every layer (and the local band's in every window)
def _edges(band: Band, r0: int, r1: int, k0: int, k1: int, device: torch.device) -> tuple[Edge, ...]:
    runs: list[list[int]] = []
    if band.lo is not None and band.lo + r1 - 1 > k0:  # the last query does not see the first keys
        runs.append([k0, min(k1, band.lo + r1 - 1)])
    if band.hi is not None and max(k0, band.floor, band.hi + r0) < k1:  # the first query misses the last keys
        start = max(k0, band.floor, band.hi + r0)
        if runs and runs[-1][1] >= start:
            runs[-1][1] = k1
        else:
            runs.append([start, k1])
    edges = []
    for start, stop in runs:
        seen = band.visible(r0, r1, start, stop, device)
        if seen is not None:
            edges.append(Edge(start, stop, ~seen, seen.float()))
    return tuple(edges)


class Part(NamedTuple):
    """Queries ``[B, H, w, D]``, keys and values ``[B, H_kv, S, D]``, and the keys each query sees: None (all) or
    a `Band` (scored parts only)."""

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    band: Band | None = None


def attend_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, H, w, D]`` over all of ``keys``/``values`` ``[B, H_kv, S, D]`` (no mask):
    the output ``[B, H, w, D]`` (values' dtype) and the log-sum-exp of each query's logits ``[B, H, w, 1]`` (float32).

    With no mask the queries of a KV head's group can be stacked into one ``[g * w, D]`` block, so GQA needs no
    repeated keys. Several queries on a CPU (fp32, bf16) go through torch's fused flash kernel, which returns the
    log-sum-exp; otherwise (one query, other devices and dtypes) two grouped matmuls with the softmax in float32.
    """
    b, h, w, d = query.shape
    n_kv = keys.shape[1]
    if w > 1 and query.device.type == "cpu" and query.dtype in _FUSED_CPU_DTYPES and keys.dtype == query.dtype:
        stacked = query.reshape(b, n_kv, (h // n_kv) * w, d)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            stacked, keys, values, 0.0, False, scale=scaling
        )
        return out.reshape(b, h, w, -1), lse.reshape(b, h, w, 1)
    return attend_with_lse_matmul(query, keys, values, scaling)


def attend_with_lse_matmul(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_with_lse` by grouped matmuls, the softmax in float32 (also its path for one query)."""
    logits = grouped_logits(query * scaling, keys).float()
    lse = logits.logsumexp(dim=-1, keepdim=True)
    probs = logits.sub_(lse).exp_()
    return grouped_weighted_sum(probs.to(values.dtype), values), lse


def merged_attention(
    scored: Sequence[Part],
    fused: Sequence[Part],
    scaling: float,
    fused_sums: bool = False,
    query_tile: int = QUERY_TILE,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One softmax over every part's keys. Every query must see at least one entry of the scored parts.

    Returns the output ``[B, H, w, D]`` (the first scored part's values' dtype) and, per scored part, the
    probability each of its keys received summed over the queries, ``[B, H, S]`` (float32); with ``fused_sums``
    also per fused part, from its logits recomputed once the softmax is known (the output is the same either
    way). Several queries are taken ``query_tile`` at a time (`_query_tiles`); the result does not depend on it
    beyond float rounding.
    """
    if not all(part.keys.shape[2] for part in (*scored, *fused)):
        raise ValueError("merged_attention: a part has no keys (leave it out)")
    if scored[0].query.shape[2] == 1:
        return _one_query(scored, fused, scaling, fused_sums)
    return _query_tiles(scored, fused, scaling, fused_sums, query_tile)


def _query_tiles(
    scored: Sequence[Part], fused: Sequence[Part], scaling: float, fused_sums: bool, query_tile: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`merged_attention` for several queries, ``query_tile`` rows at a time: each query's softmax is its own, so a
    tile of rows is normalised on its own, and a tile's logits cover only the keys its rows see (`Band.keys_seen`):
    about ``n_local + query_tile`` of InfLLM's ``n_local + w`` local keys. The tile's logits stay in cache across
    the mask, exp and sums, and a band's hidden half is never computed. The fused parts are attended for all rows
    at once first; a tile adds each one's output weighted by ``exp(lse - peak)``."""
    attended = [attend_with_lse(p.query, p.keys, p.values, scaling) for p in fused]
    first = scored[0]
    b, h, w, _ = first.query.shape
    device = first.query.device
    out = torch.empty(b, h, w, first.values.shape[-1], dtype=first.values.dtype, device=device)
    summed = [*scored, *fused] if fused_sums else list(scored)
    sums = [torch.zeros(b, h, p.keys.shape[2], dtype=torch.float32, device=device) for p in summed]
    scaled: dict[int, torch.Tensor] = {}  # parts sharing a query (the memory's) scale it once
    for part in summed:
        if id(part.query) not in scaled:
            scaled[id(part.query)] = part.query * scaling
    for r0 in range(0, w, query_tile):
        r1 = min(w, r0 + query_tile)
        tiles = []  # (index into summed, first key, probabilities (logits until the peak is known), edges)
        for i, part in enumerate(summed):
            band = part.band
            k0, k1 = (0, part.keys.shape[2]) if band is None else band.keys_seen(r0, r1, part.keys.shape[2])
            if k1 <= k0:
                continue  # no row of the tile sees this part
            query = scaled[id(part.query)][:, :, r0:r1]
            logits = cast(grouped_logits(query, part.keys[:, :, k0:k1]), torch.float32)
            edges = () if band is None else band.edges(r0, r1, k0, k1, device)
            for edge in edges:
                logits[..., edge.start - k0 : edge.stop - k0].masked_fill_(edge.hidden, _NEG)
            tiles.append((i, k0, logits, edges))
        n_scored = sum(1 for i, *_ in tiles if i < len(scored))
        peak = tiles[0][2].amax(dim=-1, keepdim=True)  # [B, H, n, 1]
        for _, _, logits, _ in tiles[1:n_scored]:
            peak = torch.maximum(peak, logits.amax(dim=-1, keepdim=True))
        for _, lse in attended:
            peak = torch.maximum(peak, lse[:, :, r0:r1])
        for _, k0, logits, edges in tiles:
            _shifted_exp(logits, peak)
            for edge in edges:  # hidden entries exactly 0
                logits[..., edge.start - k0 : edge.stop - k0].mul_(edge.seen)
        tiles = [(i, k0, p) for i, k0, p, _ in tiles]
        z = sum(p.sum(dim=-1, keepdim=True) for _, _, p in tiles[:n_scored])
        acc = None
        for i, k0, p in tiles[:n_scored]:
            part = summed[i]
            values = part.values[:, :, k0 : k0 + p.shape[-1]]
            term = grouped_weighted_sum(p.to(part.values.dtype), values).float()
            acc = term if acc is None else acc + term
        for o, lse in attended:
            weight = (lse[:, :, r0:r1] - peak).exp_()
            z = z + weight
            acc = acc + o[:, :, r0:r1].float() * weight
        out[:, :, r0:r1] = acc / z
        inv_t = (1.0 / z).transpose(-1, -2)  # [B, H, 1, n]
        for i, k0, p in tiles:
            sums[i][..., k0 : k0 + p.shape[-1]] += torch.matmul(inv_t, p).squeeze(-2)
    return out, sums


def _one_query(
    scored: Sequence[Part], fused: Sequence[Part], scaling: float, fused_sums: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`merged_attention` for one query (a decode step): its logits over every part are one short row, so they are
    concatenated and normalised by one softmax, and the probability sums are the row itself: one softmax instead of
    a peak, an exp and a normaliser per part, ops that at one query cost more than their arithmetic (timed as
    "window" by `benchmarks/bench_decode_attention.py`)."""
    parts = [*scored, *fused]
    b, h, _, d = scored[0].query.shape
    n_kv = scored[0].keys.shape[1]
    g = h // n_kv
    logits = []  # kept in the grouped layout [B, H_kv, g, S] throughout: no view per part and op
    for part in parts:
        rows = part.query.reshape(b, n_kv, g, d)
        part_logits = cast(row_logits(rows, part.keys, one_query=True), torch.float32)
        mask = None if part.band is None else part.band.visible(0, 1, 0, part.keys.shape[2], part.query.device)
        if mask is not None:
            part_logits.masked_fill_(~mask, _NEG)  # exp(_NEG - peak) is exactly 0
        logits.append(part_logits)
    # scaled once on the joint row (one op, not one per part's query); [B, H_kv, g, S_total]
    probs = torch.cat(logits, dim=-1).mul_(scaling).softmax(dim=-1)
    pieces, start = [], 0
    for part in parts:  # slices: torch's split costs a Python wrapper on top
        stop = start + part.keys.shape[2]
        pieces.append(probs[..., start:stop])
        start = stop
    out = None
    for p, part in zip(pieces, parts):
        term = cast(torch.matmul(cast(p, part.values.dtype), part.values), torch.float32)  # [B, H_kv, g, D]
        out = term if out is None else out.add_(term)
    kept = len(parts) if fused_sums else len(scored)
    out = cast(out, scored[0].values.dtype).view(b, h, 1, -1)
    return out, [p.reshape(b, h, -1) for p in pieces[:kept]]


def _shifted_exp(logits: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``exp(logits - peak)`` in place, clamped below (see `_LOWEST_EXP`; the caller zeroes hidden entries)."""
    return logits.sub_(peak).clamp_min_(_LOWEST_EXP).exp_()
