"""Attention over a set of stored entries plus the new tokens.

Every kvsieve layer attends over ``[past entries ; new tokens]``: the past entries were all seen before the
current forward (any order, any subset per head), the new tokens are the current chunk in order. The causal rule
is therefore simple and per layer: every past entry is visible, the new block is lower-triangular. Building the
mask here, from the layer's own store, is what keeps per-layer budgets (PyramidKV) and chunks on top of a
compressed cache correct: the mask transformers builds is sized from a single layer.

The output goes through transformers' own ``sdpa_attention_forward`` so that with nothing evicted the result is
bit-identical to a plain sdpa model -- except for one query in bfloat16/float16 on a CPU, where torch's sdpa is
many times slower than two matmuls (`benchmarks/bench_decode_attention.py --threads 1`, torch 2.13, this project's
2-core machine: 13.7 ms against 0.49 ms for a 8,192-key bfloat16 step of 14 query / 2 KV heads, 3.3 against 0.18 ms
at 2,048; `decode_attention`). There the grouped matmuls, with the
softmax in float32, give the output (within bfloat16 rounding of sdpa's, tested).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsieve.ops.grouped import LOW_PRECISION, grouped_logits, grouped_weighted_sum


def chunk_mask(n_query: int, n_keys: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask ``[1, 1, q, S]`` for ``q`` new tokens at the end of ``S`` keys, or None where sdpa needs none.

    None for a single query (it sees everything) and for a chunk with no past (sdpa's causal path).
    """
    if n_query == 1 or n_query == n_keys:
        return None
    n_past = n_keys - n_query
    allowed = torch.ones(n_query, n_keys, dtype=torch.bool, device=device)
    allowed[:, n_past:] = torch.ones(n_query, n_query, dtype=torch.bool, device=device).tril()
    return allowed[None, None]


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float | None,
    extra_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, q, D]`` over ``keys``/``values`` ``[B, H_kv, S, D]`` whose last ``q`` entries
    are the query tokens themselves. ``extra_mask`` (bool, broadcastable to ``[B, H, q, S]``) removes more entries.

    Returns ``[B, q, H, D]`` (the layout transformers' attention functions return).
    """
    q, s = query.shape[2], keys.shape[2]
    if q > s:
        raise ValueError(f"attention over {s} keys with {q} queries: the new tokens must be among the keys")
    if q == 1 and query.device.type == "cpu" and query.dtype in LOW_PRECISION and not kwargs.get("dropout"):
        return decode_attention(query, keys, values, scaling, extra_mask)
    mask = chunk_mask(q, s, query.device)
    if extra_mask is not None:
        causal = mask if mask is not None else _causal(q, s, query.device)
        mask = extra_mask & causal
    kwargs.pop("is_causal", None)
    out, _ = sdpa_attention_forward(
        module, query, keys, values, mask, scaling=scaling, is_causal=mask is None and q > 1, **kwargs
    )
    return out


def _causal(n_query: int, n_keys: int, device: torch.device) -> torch.Tensor:
    allowed = torch.ones(n_query, n_keys, dtype=torch.bool, device=device)
    allowed[:, n_keys - n_query :] = allowed[:, n_keys - n_query :].tril()
    return allowed[None, None]


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float | None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query's attention ``[B, H, 1, D]`` over ``keys``/``values`` ``[B, H_kv, S, D]`` as two grouped matmuls
    (no repeated keys) with the softmax in float32; ``extra_mask`` (bool, broadcastable to ``[B, H, 1, S]``) removes
    entries. Returns ``[B, 1, H, D]`` in the query's dtype."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = grouped_logits(query, keys).float() * scale
    if extra_mask is not None:
        logits = logits.masked_fill(~extra_mask, float("-inf"))
    probs = logits.softmax(dim=-1).to(values.dtype)
    return grouped_weighted_sum(probs, values).transpose(1, 2).contiguous()
