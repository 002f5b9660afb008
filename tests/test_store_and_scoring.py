"""Unit tests of the shared machinery: the preallocated store and the attention scores."""

from __future__ import annotations

import pytest
import torch

from kvsieve.ops.scoring import attention_column_sums, attention_probs, pool_scores, reduce_gqa, top_indices
from kvsieve.ops.store import KVStore


def _kv(b=2, h=3, n=5, d=4, start=0.0):
    keys = torch.arange(b * h * n * d, dtype=torch.float32).view(b, h, n, d) + start
    return keys, -keys


def test_append_grows_geometrically_and_tracks_positions():
    store = KVStore(reserve=2)
    keys, values = _kv(n=5)
    store.append(keys, values, first_position=0)
    assert store.length == 5 and store.capacity == 7
    store.append(*_kv(n=1, start=1000.0), first_position=5)
    store.append(*_kv(n=1, start=2000.0), first_position=6)
    assert store.capacity == 7  # written in place
    store.append(*_kv(n=1, start=3000.0), first_position=7)
    assert store.capacity >= 10  # grew by at least half
    assert store.positions[0, 0].tolist() == list(range(8))
    assert torch.equal(store.keys[:, :, :5], keys)
    assert torch.equal(store.values[:, :, 7:8], -_kv(n=1, start=3000.0)[0])


def test_keep_gathers_per_head_and_frees_memory():
    store = KVStore(reserve=0)
    keys, values = _kv(b=1, h=2, n=6)
    store.append(keys, values, first_position=10)
    store.add_aux("score")
    store.aux("score").copy_(torch.arange(12, dtype=torch.float32).view(1, 2, 6))
    idx = torch.tensor([[[0, 3], [1, 5]]])
    store.keep(idx)
    assert store.length == 2 and store.capacity == 2
    assert torch.equal(store.keys[0, 0], keys[0, 0, [0, 3]])
    assert torch.equal(store.keys[0, 1], keys[0, 1, [1, 5]])
    assert store.positions.tolist() == [[[10, 13], [11, 15]]]
    assert store.aux("score").tolist() == [[[0.0, 3.0], [7.0, 11.0]]]
    assert store.allocated_bytes() == 2 * (1 * 2 * 2 * 4 * 4)


def test_evict_moves_the_last_entry_into_the_slot():
    store = KVStore()
    keys, values = _kv(b=1, h=2, n=4)
    store.append(keys, values, first_position=0)
    store.evict(torch.tensor([[1, 3]]))  # head 0 loses entry 1, head 1 loses its last entry
    assert store.length == 3
    assert store.positions.tolist() == [[[0, 3, 2], [0, 1, 2]]]
    assert torch.equal(store.keys[0, 0, 1], keys[0, 0, 3])
    assert torch.equal(store.values[0, 1], values[0, 1, :3])


def test_evict_with_one_row_and_one_kv_head():
    """MQA at batch 1 (Gemma-3-270m has one KV head): the last entry's view is dense inside the buffer, and writing
    it into a slot in place used to raise ("some elements ... refer to a single memory location")."""
    store = KVStore()
    keys, values = _kv(b=1, h=1, n=4)
    store.append(keys, values, first_position=0)
    store.add_aux("score")
    store.evict(torch.tensor([[0]]))
    assert store.positions.tolist() == [[[3, 1, 2]]]
    assert torch.equal(store.keys[0, 0], keys[0, 0, [3, 1, 2]])
    assert torch.equal(store.values[0, 0], values[0, 0, [3, 1, 2]])


def _naive_probs(query, keys, scaling):
    """Full causal softmax with keys repeated per query head; the last q keys are the queries."""
    g = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    q, s = query.shape[2], keys.shape[2]
    causal = torch.arange(s)[None, :] <= (torch.arange(q) + s - q)[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def test_attention_probs_and_blocked_column_sums_match_the_naive_computation():
    torch.manual_seed(0)
    query = torch.randn(2, 6, 10, 8)
    keys = torch.randn(2, 2, 10, 8)
    naive = _naive_probs(query, keys, 0.3)
    assert torch.allclose(attention_probs(query, keys, 0.3), naive, atol=1e-6)
    # column sums over all queries, three queries at a time: never the full q x S matrix
    sums = attention_column_sums(query, keys, 0.3, query_start=0, block=3)
    assert torch.allclose(sums, naive.sum(dim=2), atol=1e-5)
    # the last 4 queries only (they sit at positions 6..9)
    tail = attention_column_sums(query[:, :, 6:], keys, 0.3, query_start=6, block=3)
    assert torch.allclose(tail, naive[:, :, 6:].sum(dim=2), atol=1e-5)


def test_pooling_reduce_and_topk():
    scores = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]]])
    assert pool_scores(scores, 3).tolist() == [[[5.0, 5.0, 5.0, 0.0, 1.0, 1.0, 1.0]]]
    per_query_head = torch.tensor([[[1.0], [3.0], [2.0], [8.0]]])  # 4 query heads, 2 KV heads
    assert reduce_gqa(per_query_head, 2, "mean").tolist() == [[[2.0], [5.0]]]
    assert reduce_gqa(per_query_head, 2, "max").tolist() == [[[3.0], [8.0]]]
    with pytest.raises(ValueError, match="gqa reduction"):
        reduce_gqa(per_query_head, 2, "median")
    assert top_indices(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2).tolist() == [[1, 3]]
