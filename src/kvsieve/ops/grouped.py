"""Attention over grouped query heads (GQA) without repeating keys, and block relevance scores (InfLLM's single
softmax over its key sets is `kvsieve.ops.merged`).

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads (query head ``h`` reads KV head ``h // (H / H_kv)``,
transformers' ``repeat_kv`` layout), ``w`` queries, ``S`` keys, ``D`` head dim, ``N`` blocks.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)  # dtypes whose CPU kernels kvsieve routes differently


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without a dispatch when it has that dtype already: a decode step's per-layer ops in
    float32, where each ``.float()`` would still cost a dispatch (`benchmarks/op_counts.py`)."""
    return x if x.dtype == dtype else x.to(dtype)


def grouped_logits(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``query`` ``[B, H, w, D]`` x ``keys`` ``[B, H_kv, S, D]`` -> ``[B, H, w, S]`` (query head h reads KV head
    ``h // g``) without repeating the keys."""
    b, h, w, d = query.shape
    n_kv = keys.shape[1]
    rows = query.reshape(b, n_kv, (h // n_kv) * w, d)
    return row_logits(rows, keys, one_query=w == 1).reshape(b, h, w, -1)


def row_logits(rows: torch.Tensor, keys: torch.Tensor, one_query: bool) -> torch.Tensor:
    """Each KV head's stacked query rows ``[B, H_kv, r, D]`` x its ``keys`` ``[B, H_kv, S, D]`` -> ``[B, H_kv, r,
    S]`` (`grouped_logits` without its layout; ``one_query``: the rows are one query's heads)."""
    if one_query and keys.dtype in LOW_PRECISION and keys.device.type == "cpu" and not keys.is_contiguous():
        # A decode step over a slice of a cache buffer: torch's CPU bf16 matmul is several times slower with that
        # strided slice as the transposed operand than as ``K @ Q^T`` (the same dot products; "grouped, slice" in
        # `benchmarks/bench_decode_attention.py`); the few rows are then laid out again (equal logits: tests).
        return torch.matmul(keys, rows.transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(rows, keys.transpose(-1, -2))


def grouped_weighted_sum(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs`` ``[B, H, w, S]`` x ``values`` ``[B, H_kv, S, D]`` -> ``[B, H, w, D]``."""
    b, h, w, s = probs.shape
    n_kv = values.shape[1]
    out = torch.matmul(probs.reshape(b, n_kv, (h // n_kv) * w, s), values)
    return out.view(b, h, w, -1)


def dot_scores(reprs: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """InfLLM's block relevance: ``<probe, repr_B>`` over the concatenated heads. ``reprs`` ``[B, N, H * D]``,
    ``probe`` ``[B, H * D]`` -> ``[B, N]``."""
    return torch.bmm(reprs, probe[..., None]).squeeze(-1)
