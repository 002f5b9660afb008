"""Attention-based scores that eviction methods rank entries by.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``g = H / H_kv`` the GQA group size, ``q`` queries,
``S`` keys, ``D`` head dim. Query head ``h`` reads KV head ``h // g`` (transformers' ``repeat_kv`` layout).
Scores are computed in float32 and never materialise an ``S x S`` matrix: queries are processed in blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kvsieve.ops.grouped import cast

GqaReduce = Literal["mean", "max", "sum"]


def _grouped(query: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """``[B, H, q, D]`` -> ``[B, H_kv, g * q, D]``: the queries of each KV head's group stacked together."""
    b, h, q, d = query.shape
    return query.reshape(b, n_kv_heads, (h // n_kv_heads) * q, d)


def attention_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H, q, S]`` (float32) of ``query`` over ``keys`` ``[B, H_kv, S, D]``.

    Causality: if positions are given (``query_positions`` ``[q]``, ``key_positions`` ``[B, H_kv, S]``), key ``j``
    is visible to query ``i`` iff ``key_pos[j] <= query_pos[i]``; otherwise the last ``q`` keys are the queries.
    Meant for few queries (decode steps, observation windows); use `attention_column_sums` for many.
    """
    b, h, q, _ = query.shape
    n_kv, s = keys.shape[1], keys.shape[2]
    rows, keys_t = _grouped(cast(query, torch.float32), n_kv), cast(keys, torch.float32).transpose(-1, -2)
    logits = torch.matmul(rows, keys_t) * scaling
    logits = logits.view(b, n_kv, h // n_kv, q, s)
    visible = _visibility(q, s, query.device, query_positions, key_positions)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).view(b, h, q, s)


def _visibility(q, s, device, query_positions, key_positions) -> torch.Tensor | None:
    """Boolean ``[B|1, H_kv|1, 1, q, S]`` visibility, or None when every key is visible to every query."""
    if query_positions is not None and key_positions is not None:
        return key_positions[:, :, None, None, :] <= query_positions.view(1, 1, 1, q, 1)
    if q == 1:
        return None
    allowed = torch.ones(q, s, dtype=torch.bool, device=device)
    allowed[:, s - q :] = allowed[:, s - q :].tril()
    return allowed[None, None, None]


def attention_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    query_start: int,
    block: int = 512,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over queries of their causal softmax attention on each key: ``[B, H, S]`` (float32).

    ``query`` ``[B, H, q, D]`` holds the queries of tokens ``query_start .. query_start + q - 1``; key ``j`` has
    logical position ``key_positions[..., j]`` (default ``j``: the keys are the prefix in order). Queries are
    processed ``block`` at a time, so the peak extra memory is ``B * H * block * S`` floats, never ``q * S``.

    Cost: with the default positions a block only scores the keys it can see (a causal triangle, about half the
    work of a square), and each probability row is normalised through one matrix-vector product
    (``sum_i p_ij = sum_i exp(l_ij - m_i) / Z_i``) instead of a softmax pass plus a sum pass.
    """
    b, h, q, _ = query.shape
    n_kv, s = keys.shape[1], keys.shape[2]
    g = h // n_kv
    ordered = key_positions is None
    if ordered:
        key_positions = torch.arange(s, device=keys.device).view(1, 1, s).expand(b, n_kv, s)
    keys_t = keys.float().transpose(-1, -2)
    total = torch.zeros(b, n_kv, g, s, dtype=torch.float32, device=query.device)
    for start in range(0, q, block):
        stop = min(q, start + block)
        n = stop - start
        # keys beyond the block's last query are invisible to all of it (prefix order only)
        width = min(s, query_start + stop) if ordered else s
        qpos = torch.arange(query_start + start, query_start + stop, device=query.device)
        scaled = _grouped(query[:, :, start:stop].float() * scaling, n_kv)  # [B, H_kv, g * n, D]
        logits = torch.matmul(scaled, keys_t[..., :width]).view(b, n_kv, g, n, width)
        visible = key_positions[:, :, None, None, :width] <= qpos.view(1, 1, 1, n, 1)
        logits.masked_fill_(~visible, float("-inf"))
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # every query sees itself: finite maxima
        inv_z = logits.sum(dim=-1).reciprocal_()  # [B, H_kv, g, n]
        total[..., :width] += torch.matmul(inv_z.unsqueeze(-2), logits).squeeze(-2)
    return total.view(b, h, s)


def pool_scores(scores: torch.Tensor, kernel: int, kind: Literal["max", "avg"] = "max") -> torch.Tensor:
    """1-D pooling along the last axis with 'same' zero padding (SnapKV's clustering of neighbouring tokens).

    Average pooling counts the padding (``F.avg_pool1d``'s default, as SnapKV's released code and kvpress use
    it): the first and last ``kernel // 2`` entries are divided by the whole kernel.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if kind == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled[..., : shape[-1]].reshape(shape)


def reduce_gqa(scores: torch.Tensor, n_kv_heads: int, how: GqaReduce = "mean") -> torch.Tensor:
    """``[B, H, ...]`` per query head -> ``[B, H_kv, ...]`` per KV head, over each GQA group."""
    b, h = scores.shape[:2]
    grouped = scores.reshape(b, n_kv_heads, h // n_kv_heads, *scores.shape[2:])
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    if how == "sum":
        return grouped.sum(dim=2)
    raise ValueError(f"gqa reduction must be 'mean', 'max' or 'sum', got {how!r}")


def top_indices(scores: torch.Tensor, k: int, ascending: bool = True) -> torch.Tensor:
    """Indices ``[..., k]`` of the ``k`` largest scores along the last axis, sorted ascending (``ascending=False``:
    in ``topk``'s order, for callers to which the order is nothing, such as InfLLM's block selection, whose blocks
    take the attended buffer's places whatever their order: one sort fewer per layer and decode step)."""
    if k <= 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values if ascending else idx
