"""Attention over grouped query heads (GQA) without repeating keys, InfLLM's single softmax over two key sets,
and block relevance scores.

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads (query head ``h`` reads KV head ``h // (H / H_kv)``,
transformers' ``repeat_kv`` layout), ``w`` queries, ``S`` keys, ``D`` head dim, ``N`` blocks.
"""

from __future__ import annotations

import torch


def grouped_logits(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``query`` ``[B, H, w, D]`` x ``keys`` ``[B, H_kv, S, D]`` -> ``[B, H, w, S]`` (query head h reads KV head
    ``h // g``) without repeating the keys."""
    b, h, w, d = query.shape
    n_kv = keys.shape[1]
    out = torch.matmul(query.reshape(b, n_kv, (h // n_kv) * w, d), keys.transpose(-1, -2))
    return out.view(b, h, w, -1)


def grouped_weighted_sum(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs`` ``[B, H, w, S]`` x ``values`` ``[B, H_kv, S, D]`` -> ``[B, H, w, D]``."""
    b, h, w, s = probs.shape
    n_kv = values.shape[1]
    out = torch.matmul(probs.reshape(b, n_kv, (h // n_kv) * w, s), values)
    return out.view(b, h, w, -1)


def two_part_attention(
    q_loc: torch.Tensor,
    k_loc: torch.Tensor,
    v_loc: torch.Tensor,
    loc_mask: torch.Tensor,
    q_mem: torch.Tensor,
    k_mem: torch.Tensor,
    v_mem: torch.Tensor,
    tail_mask: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One softmax over ``[q_loc . k_loc ; q_mem . k_mem]`` (InfLLM's single softmax over local and memory keys).

    ``q_*`` ``[B, H, w, D]``, ``k_*``/``v_*`` ``[B, H_kv, S_*, D]``; ``loc_mask`` ``[w, S_loc]`` (bool, True =
    visible); ``tail_mask`` ``[w, t]`` masks the last ``t`` memory keys (the rest are visible to every query).
    Returns the output ``[B, H, w, D]`` and, summed over the queries, the probabilities of the local keys
    ``[B, H, S_loc]`` and of the memory keys ``[B, H, S_mem]`` (float32). The probabilities are normalised through
    the output and the sums (``1/Z`` times a matrix-vector product) instead of over the whole logits matrix.
    """
    neg = torch.finfo(torch.float32).min  # finite: a fully masked tail never makes inf - inf
    l_loc = grouped_logits(q_loc * scaling, k_loc).float()
    l_loc.masked_fill_(~loc_mask, neg)
    peak = l_loc.amax(dim=-1, keepdim=True)  # every query sees itself: finite
    s_mem, t = k_mem.shape[2], tail_mask.shape[1]
    if s_mem:
        l_mem = grouped_logits(q_mem * scaling, k_mem).float()
        if t:
            l_mem[..., s_mem - t :].masked_fill_(~tail_mask, neg)
        peak = torch.maximum(peak, l_mem.amax(dim=-1, keepdim=True))
        p_mem = l_mem.sub_(peak).exp_()
    p_loc = l_loc.sub_(peak).exp_()
    z = p_loc.sum(dim=-1, keepdim=True)
    out = grouped_weighted_sum(p_loc.to(v_loc.dtype), v_loc).float()
    if s_mem:
        z += p_mem.sum(dim=-1, keepdim=True)
        out += grouped_weighted_sum(p_mem.to(v_mem.dtype), v_mem).float()
    inv = 1.0 / z  # [B, H, w, 1]
    inv_t = inv.transpose(-1, -2)  # [B, H, 1, w]
    p_loc_sum = torch.matmul(inv_t, p_loc).squeeze(-2)
    p_mem_sum = torch.matmul(inv_t, p_mem).squeeze(-2) if s_mem else l_loc.new_zeros(*l_loc.shape[:2], 0)
    return (out * inv).to(v_loc.dtype), p_loc_sum, p_mem_sum


def dot_scores(reprs: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """InfLLM's block relevance: ``<probe, repr_B>`` over the concatenated heads. ``reprs`` ``[B, N, H * D]``,
    ``probe`` ``[B, H * D]`` -> ``[B, N]``."""
    return torch.bmm(reprs, probe[..., None]).squeeze(-1)
