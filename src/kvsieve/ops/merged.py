"""One softmax over several key sets, each attended on its own and merged exactly through log-sum-exps.

InfLLM's window attends, with one softmax, to parts that each have their own queries (the model's RoPE for the
local window, the single angle of ``n_local - 1`` for the memory) and keys: concatenating them costs a copy of
every retrieved block per window and a mask over all of them. Here each part is attended where it lies and the
parts are merged: with ``m`` the largest logit of a query over all parts, ``Z = sum_parts sum_j exp(l_j - m)`` and
``out = sum_parts sum_j exp(l_j - m) v_j / Z``; a part attended by a fused kernel contributes its output ``o`` and
log-sum-exp ``L`` as ``exp(L - m) o`` to the sum and ``exp(L - m)`` to ``Z``. Equal to the concatenated softmax up to
float rounding (`tests/test_blocks_fast.py`).

Two kinds of parts:

* *scored* parts (`Part` in ``scored``): logits are materialised, a mask may hide entries, and the probability
  each key received, summed over the queries, is returned (InfLLM's representative scores and ``lru-s`` credit);
* *fused* parts (``fused``): every key visible to every query; attended by torch's fused CPU kernel for several
  queries (`attend_with_lse`), by two grouped matmuls for one.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads (query head ``h`` reads KV head ``h // (H / H_kv)``),
``w`` queries, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvsieve.ops.grouped import cast, grouped_logits, grouped_weighted_sum

_FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16)
_NEG = torch.finfo(torch.float32).min  # finite: a fully masked row never makes inf - inf
# Shifted logits are raised to this before exp: torch's CPU exp is 10-100x slower on arguments whose result
# underflows (below about -87.3: masked entries, far-off keys) than on others (measured, torch 2.13, AVX512). An entry
# this far below the row's peak weighs exp(-80) ~ 2e-35 of it instead of less: far below float32 resolution of the
# sum (which is >= 1); masked entries are then zeroed exactly.
_LOWEST_EXP = -80.0


class Part(NamedTuple):
    """Queries ``[B, H, w, D]``, keys and values ``[B, H_kv, S, D]``, and the visible entries: None (all) or a bool
    mask broadcastable to ``[B, H, w, S]`` (True = visible)."""

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None = None


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
    scored: Sequence[Part], fused: Sequence[Part], scaling: float, fused_sums: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One softmax over every part's keys. Every query must see at least one entry of the scored parts.

    Returns the output ``[B, H, w, D]`` (the first scored part's values' dtype) and, per scored part, the
    probability each of its keys received summed over the queries, ``[B, H, S]`` (float32); with ``fused_sums``
    also per fused part, from its logits recomputed once the softmax is known (the output is the same either
    way). The probabilities are normalised through the sums (``1/Z`` times a matrix-vector product), never over
    the whole logits matrix.
    """
    if not all(part.keys.shape[2] for part in (*scored, *fused)):
        raise ValueError("merged_attention: a part has no keys (leave it out)")
    if scored[0].query.shape[2] == 1:
        return _one_query(scored, fused, scaling, fused_sums)
    logits = []
    for part in scored:
        part_logits = grouped_logits(part.query * scaling, part.keys).float()
        if part.mask is not None:
            part_logits.masked_fill_(~part.mask, _NEG)
        logits.append(part_logits)
    attended = [attend_with_lse(p.query, p.keys, p.values, scaling) for p in fused]
    peak = logits[0].amax(dim=-1, keepdim=True)  # [B, H, w, 1]
    for part_logits in logits[1:]:
        peak = torch.maximum(peak, part_logits.amax(dim=-1, keepdim=True))
    for _, lse in attended:
        peak = torch.maximum(peak, lse)
    probs = [_shifted_exp(part_logits, peak, part.mask) for part_logits, part in zip(logits, scored)]
    z = sum(p.sum(dim=-1, keepdim=True) for p in probs)
    out = sum(grouped_weighted_sum(p.to(part.values.dtype), part.values).float() for p, part in zip(probs, scored))
    for o, lse in attended:
        weight = (lse - peak).exp_()
        z = z + weight
        out = out + o.float() * weight
    inv_t = (1.0 / z).transpose(-1, -2)  # [B, H, 1, w]
    if fused_sums:
        probs += [_shifted_exp(grouped_logits(p.query * scaling, p.keys).float(), peak, None) for p in fused]
    sums = [torch.matmul(inv_t, p).squeeze(-2) for p in probs]
    return (out / z).to(scored[0].values.dtype), sums


def _one_query(
    scored: Sequence[Part], fused: Sequence[Part], scaling: float, fused_sums: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`merged_attention` for one query (a decode step): its logits over every part are one short row, so they are
    concatenated and normalised by one softmax, and the probability sums are the row itself: one softmax instead of
    a peak, an exp and a normaliser per part, ops that at one query cost more than their arithmetic (timed as
    "window" by `benchmarks/bench_decode_attention.py`)."""
    parts = [*scored, *fused]
    scaled: dict[int, torch.Tensor] = {}  # parts sharing a query (the memory's) scale it once
    logits = []
    for part in parts:
        query = scaled.get(id(part.query))
        if query is None:
            query = scaled[id(part.query)] = part.query * scaling
        part_logits = cast(grouped_logits(query, part.keys), torch.float32)
        if part.mask is not None:
            part_logits.masked_fill_(~part.mask, _NEG)  # exp(_NEG - peak) is exactly 0
        logits.append(part_logits)
    probs = torch.cat(logits, dim=-1).softmax(dim=-1)  # [B, H, 1, S_total]
    pieces = probs.split([part.keys.shape[2] for part in parts], dim=-1)
    out = None
    for p, part in zip(pieces, parts):
        term = cast(grouped_weighted_sum(cast(p, part.values.dtype), part.values), torch.float32)
        out = term if out is None else out + term
    kept = len(parts) if fused_sums else len(scored)
    return cast(out, scored[0].values.dtype), [p.squeeze(-2) for p in pieces[:kept]]


def _shifted_exp(logits: torch.Tensor, peak: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``exp(logits - peak)`` in place, masked entries exactly 0 (see `_LOWEST_EXP`)."""
    p = logits.sub_(peak).clamp_min_(_LOWEST_EXP).exp_()
    return p if mask is None else p.mul_(mask)
