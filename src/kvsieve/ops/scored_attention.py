"""Prefill attention that also returns the attention mass every key receives (H2O's accumulated scores).

Shapes: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads (query head ``h`` reads KV head ``h // g``, ``g = H /
H_kv``), ``q`` queries, ``S`` keys, ``D`` head dim. The keys are the prefix in order (key ``j`` is token ``j``) and
the queries are tokens ``query_start .. query_start + q - 1``: query ``i`` sees key ``j`` iff
``j <= query_start + i``.

Two parts (`attention_with_lse`, then `prefix_column_sums`), so that the attention is not computed twice:

* the output is exactly `kvsieve.ops.attention.attend`'s (bit for bit: a model whose cache evicts nothing, or a
  shared prefill, must match the full cache). On a CPU it comes from the very flash kernel that sdpa dispatches to,
  called directly because it also returns each query's log-sum-exp ``lse_i``;
* the column sums ``sum_i exp(q_i . k_j * scale - lse_i)`` (`prefix_column_sums`) then cost, in float32, float16
  and off the CPU (`causal_column_sums`), one ``Q K^T`` per tile of queries x keys: the
  ``- lse_i`` is folded into the product as one more dimension and the scale is the matmul's alpha (``scale x
  [q_i, -lse_i / scale] . [k_j, 1]``), the exponential is taken in place, only tiles on the diagonal are masked,
  and the tile is summed over its queries. No softmax pass, no second ``P V``, never the ``q x S`` matrix: the
  peak extra memory is one tile. With ``per_query_head=False`` (H2O's ``gqa_reduce`` mean or sum) a tile is
  summed over all ``g * block`` rows of its KV head at once, one contiguous reduction;
* on a CPU in bfloat16 the sums come from the flash kernel too, the keys attending the queries
  (`swapped_column_sums`): a key's sum is the log-sum-exp of its logits less each query's ``lse_i``, the products
  accumulated in float32 and never rounded to bfloat16 (1e-4 of the float64 sums over every key, where rounding
  the logit, as H2O's release does, is ~1.5e-2 off), at about the attention's cost (1.05-1.3x the flash kernel,
  the tiles 1.5-1.9x);
* elsewhere in bfloat16/float16 the tiles' product is the model's dtype's matmul, as in H2O's release (whose logits
  ``q . k`` are bfloat16), with ``- lse_i / scale`` as two dimensions (its high and low parts: a single one would
  be off by ~0.04 in the exponent): the matmul accumulates ``q_i . k_j * scale - lse_i`` in float32 and rounds it
  once, after the subtraction, where the release rounds the logit itself; the exponential is float32. A
  probability's exponent is then off by ``|log p| x 2^-9`` instead of ``|logit| x 2^-9``: smaller exactly where a
  key draws attention (the keys a 20% budget keeps: within 3e-3 of the exact sums, the release's rounding up to
  1e-2; tests). ``lse_i`` is the flash kernel's (float32 accumulation).

Elsewhere (no CPU flash kernel, dropout, soft-capping) the output comes from `attend` and the log-sum-exp from a
tiled pass of its own (`causal_lse`).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from kvsieve.ops.attention import attend, chunk_mask
from kvsieve.ops.grouped import LOW_PRECISION

# keys per tile of the column-sum pass on a CPU: a tile of g * block x 256 floats stays in cache. In the model 256
# is even with 512 or ahead of it, fp32 and bf16 (`benchmarks/bench_h2o_prefill.py --key-tiles`, docs/results/speed.md)
KEY_TILE = 256
# On an accelerator the loop's cost is its launches, not its cache misses (an H200 spent 30 s in ~260,000 CPU-sized
# tiles of a 32K prefill, docs/results/gpu_decode.md): one key tile, queries blocked to about this many floats.
ACCELERATOR_TILE_ELEMENTS = 2**28


def tiling(query: torch.Tensor, n_keys: int, block: int) -> tuple[int, int]:
    """``(queries per block, keys per tile)`` of the passes over ``query`` ``[B, H, q, D]`` and ``n_keys`` keys:
    ``block`` x `KEY_TILE` on a CPU; elsewhere every key in one tile and blocks of at least ``block`` queries, as
    many as keep a tile near `ACCELERATOR_TILE_ELEMENTS`. Memory, not results: the sums agree up to rounding."""
    if query.device.type == "cpu":
        return block, KEY_TILE
    b, h, q = query.shape[:3]
    return min(q, max(block, ACCELERATOR_TILE_ELEMENTS // max(1, b * h * n_keys))), max(1, n_keys)


_flash_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_applies(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> bool:
    """Whether `attend` would run sdpa's CPU flash kernel with exactly the arguments `_flash_with_lse` passes."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, *LOW_PRECISION)
        and not (query.shape[2] == 1 and query.dtype in LOW_PRECISION)  # `attend`'s grouped matmuls, not sdpa
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and getattr(module, "is_causal", True)
    )


def _flash_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa's CPU flash kernel as transformers' ``sdpa_attention_forward`` calls it for `attend`'s arguments.

    Returns the output ``[B, q, H, D]`` and the log-sum-exp ``[B, H, q]`` (float32).
    """
    q, s = query.shape[2], keys.shape[2]
    if q == s:  # the whole prompt: sdpa's causal path, GQA inside the kernel
        out, lse = _flash_for_cpu(query, keys, values, 0.0, True, scale=scaling)
    elif q == 1:  # one query sees every key
        out, lse = _flash_for_cpu(query, keys, values, 0.0, False, scale=scaling)
    else:  # a chunk after a past: transformers repeats the KV heads and passes the boolean mask (as a float one)
        group = query.shape[1] // keys.shape[1]
        allowed = chunk_mask(q, s, query.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -torch.inf)
        out, lse = _flash_for_cpu(
            query, repeat_kv(keys, group), repeat_kv(values, group), 0.0, False, attn_mask=mask, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), lse


def causal_lse(query: torch.Tensor, keys: torch.Tensor, scaling: float, query_start: int, block: int) -> torch.Tensor:
    """Log-sum-exp ``[B, H, q]`` (float32) of each query's causal logits, ``block`` queries at a time."""
    b, h, q, d = query.shape
    n_kv = keys.shape[1]
    g = h // n_kv
    keys_t = keys.float().transpose(-1, -2)
    lse = torch.empty(b, n_kv, g, q, dtype=torch.float32, device=query.device)
    for start in range(0, q, block):
        stop = min(q, start + block)
        n, width = stop - start, query_start + stop
        rows = (query[:, :, start:stop].float() * scaling).reshape(b, n_kv, g * n, d)
        logits = torch.matmul(rows, keys_t[..., :width]).view(b, n_kv, g, n, width)
        future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
        logits[..., query_start + start :].masked_fill_(future, -torch.inf)
        lse[..., start:stop] = logits.logsumexp(dim=-1)
    return lse.view(b, h, q)


def causal_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    lse: torch.Tensor,
    query_start: int,
    block: int,
    per_query_head: bool = True,
    key_tile: int = KEY_TILE,
) -> torch.Tensor:
    """``sum_i softmax_i[j]`` over the queries ``[B, H, q, D]`` for each key ``[B, H_kv, S, D]``: ``[B, H, S]``
    (float32), from each query's log-sum-exp ``lse`` ``[B, H, q]``; tiles of ``block`` queries x ``key_tile`` keys.

    ``per_query_head=False`` sums over each KV head's ``g`` query heads as well: ``[B, H_kv, S]`` (one contiguous
    reduction over the tile's ``g * block`` rows instead of ``g`` reductions). ``-lse`` is folded into the
    product: ``scale x [q_i, -lse_i / scale] . [k_j, 1]``, the scale as the matmul's alpha, in float32; in a
    low-precision dtype the matmul is the model's dtype's (one rounding, of the scaled sum) and ``-lse_i / scale``
    two dimensions, its high and low parts (one would be off by ~0.04 in the exponent).
    """
    b, h, q = query.shape[:3]
    n_kv, s = keys.shape[1], keys.shape[2]
    g = h // n_kv
    # the matmul's alpha scales q . k and the folded -lse / scale together, before its one rounding
    neg_lse = lse.unsqueeze(-1) / -scaling  # [B, H, q, 1] float32
    if query.dtype in LOW_PRECISION:
        high = neg_lse.to(query.dtype)
        folded = [high, (neg_lse - high.float()).to(query.dtype)]
        dtype = query.dtype
    else:
        folded, dtype = [neg_lse], torch.float32
    ones = torch.ones(b, n_kv, s, len(folded), dtype=dtype, device=keys.device)
    keys_t = torch.cat([keys.to(dtype), ones], dim=-1).transpose(-1, -2)  # [B, H_kv, D + f, S]
    if dtype != torch.float32:  # oneDNN's low-precision matmul reads the keys' tiles faster laid out [D + f, S]
        keys_t = keys_t.contiguous()
    rows_all = torch.cat([query.to(dtype), *folded], dim=-1)  # [B, H, q, D + f]
    width_d = rows_all.shape[-1]
    unused = torch.zeros((), dtype=dtype, device=query.device)  # baddbmm's input, weighted by beta=0
    total = torch.zeros(b, n_kv, g if per_query_head else 1, s, dtype=torch.float32, device=query.device)
    future = torch.ones(block, block, dtype=torch.bool, device=query.device).triu_(1)
    # every tile is written into the same buffers: a fresh tile of ~1 MB per matmul costs its page faults
    size = b * n_kv * g * min(block, q) * min(key_tile, s)
    exponent_buffer = torch.empty(size, dtype=dtype, device=query.device)
    prob_buffer = exponent_buffer if dtype == torch.float32 else torch.empty(size, device=query.device)
    for start in range(0, q, block):
        stop = min(q, start + block)
        n = stop - start
        diagonal = query_start + start  # keys from here on are the block's own tokens: a causal triangle
        rows = rows_all[:, :, start:stop].reshape(b * n_kv, g * n, width_d)
        for k0 in range(0, query_start + stop, key_tile):
            k1 = min(query_start + stop, k0 + key_tile)
            tile = keys_t[..., k0:k1].reshape(b * n_kv, width_d, k1 - k0)  # a view
            used = b * n_kv * g * n * (k1 - k0)
            exponents = exponent_buffer[:used].view(b * n_kv, g * n, k1 - k0)
            torch.baddbmm(unused, rows, tile, beta=0, alpha=scaling, out=exponents)
            probs = exponents
            if prob_buffer is not exponent_buffer:  # the exponential in float32
                probs = prob_buffer[:used].view(b * n_kv, g * n, k1 - k0).copy_(exponents)
            probs = probs.exp_().view(b, n_kv, g * n, k1 - k0)
            if k1 > diagonal:  # query r sees key diagonal + t iff t <= r (invisible ones may be inf: overwritten)
                lo = max(k0, diagonal)
                visible = probs.view(b, n_kv, g, n, k1 - k0)[..., lo - k0 :]
                visible.masked_fill_(future[:n, lo - diagonal : k1 - diagonal], 0.0)
            if per_query_head:
                total[..., k0:k1] += probs.view(b, n_kv, g, n, k1 - k0).sum(dim=3)
            else:
                total[:, :, 0, k0:k1] += probs.sum(dim=2)
    return total.view(b, -1, s)


def attention_with_lse(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float | None,
    query_start: int,
    block: int = 128,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend`'s output ``[B, q, H, D]`` (bit for bit) for ``query`` ``[B, H, q, D]`` over the prefix
    ``keys``/``values`` ``[B, H_kv, S, D]`` (``S = query_start + q``), and each query's log-sum-exp ``[B, H, q]``
    (float32): the flash kernel's where it is `attend`'s, else a tiled pass (`causal_lse`, blocks of `tiling`)."""
    q, s = query.shape[2], keys.shape[2]
    if query_start + q != s:
        raise ValueError(f"keys: {q} queries from token {query_start} need {query_start + q} keys, got {s}")
    if _flash_applies(module, query, kwargs):
        return _flash_with_lse(query, keys, values, scaling)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    lse = causal_lse(query, keys, scale, query_start, tiling(query, s, block)[0])
    return attend(module, query, keys, values, scaling, **kwargs), lse


def swapped_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    lse: torch.Tensor,
    query_start: int,
    per_query_head: bool = True,
) -> torch.Tensor:
    """`causal_column_sums` by the CPU flash kernel, for a bfloat16 (or float16) ``query`` ``[B, H, q, D]`` and
    ``keys`` ``[B, H_kv, S, D]``: ``[B, H, S]`` float32 (``[B, H_kv, S]`` if not ``per_query_head``).

    A key's column sum is ``exp(logsumexp_i(scale x q_i . k_j - lse_i))`` over the queries that see it: the
    log-sum-exp the kernel returns when the keys attend the queries. So the keys are the kernel's queries, the
    queries its keys, each with ``-lse_i / scale`` folded in as two more dimensions (its high and low parts) against
    two ones on the key side, and the values zeros (only the log-sum-exp is read). Key ``j`` sees query ``i`` iff
    ``j <= query_start + i``: reversing both sequences makes that the kernel's causal triangle for the chunk's own
    keys; the keys before the chunk see every query (no mask). The kernel accumulates the products in float32, so
    ``logit - lse`` is never rounded to the model's dtype, and its exponentials are fused with the sums: about the
    attention's cost (bfloat16 on an AMX CPU: 1.05-1.3x the flash kernel at the default model's and Qwen2.5-0.5B's
    shapes, where the tiled pass costs 1.5-1.9x; float16, whose flash kernel has no AMX path: 1.17x, the tiles
    0.84x; docs/results/speed.md)."""
    b, h, q = query.shape[:3]
    n_kv, s = keys.shape[1], keys.shape[2]
    g, dtype = h // n_kv, query.dtype
    shifted = lse.unsqueeze(-1) / -scaling  # [B, H, q, 1] float32
    high = shifted.to(dtype)
    as_keys = torch.cat([query, high, (shifted - high.float()).to(dtype)], dim=-1).flip(2)  # [B, H, q, D + 2]
    as_queries = torch.cat([keys, keys.new_ones(b, n_kv, s, 2)], dim=-1).flip(2)  # [B, H_kv, S, D + 2]
    as_queries = as_queries.repeat_interleave(g, dim=1)  # the kernel maps query heads onto fewer KV heads only
    zeros = torch.zeros_like(as_keys)
    _, own = _flash_for_cpu(as_queries[:, :, :q], as_keys, zeros, 0.0, True, scale=scaling)  # [B, H, q]
    parts = [own]
    if query_start:  # the keys before the chunk, last first
        parts.append(_flash_for_cpu(as_queries[:, :, q:], as_keys, zeros, 0.0, False, scale=scaling)[1])
    sums = torch.cat(parts, dim=-1).flip(-1).exp_()  # [B, H, S], keys in order again
    return sums if per_query_head else sums.view(b, n_kv, g, s).sum(dim=2)


def prefix_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float | None,
    lse: torch.Tensor,
    query_start: int,
    block: int = 128,
    per_query_head: bool = True,
) -> torch.Tensor:
    """Each key's attention summed over the queries, ``[B, H, S]`` (float32; ``[B, H_kv, S]`` summed over each KV
    head's query heads too if not ``per_query_head``), from the log-sum-exp ``lse`` of `attention_with_lse`:
    `swapped_column_sums` on a CPU in bfloat16, else `causal_column_sums` at the device's tiling
    (`tiling`); ``scaling`` None: the model's default scale."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:  # float16: the tiles are faster (no AMX)
        return swapped_column_sums(query, keys, scale, lse, query_start, per_query_head)
    block, key_tile = tiling(query, keys.shape[2], block)
    return causal_column_sums(query, keys, scale, lse, query_start, block, per_query_head, key_tile)
