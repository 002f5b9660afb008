"""StreamingLLM's rolling decode through the host-side ring (`KVStore.evict_slot`): the same store, bit for bit, as
the generic priority + argmin eviction, over several turns of the ring; layouts that are not the plain one fall
back to the generic path."""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import greedy_with_logits, random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.methods.streamingllm import StreamingLLMPolicy
from kvsieve.ops.store import KVStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _stores(cache: SieveCache) -> list[KVStore]:
    return [layer.policy.store for layer in cache.layers]


@pytest.mark.parametrize(("prompt", "question"), [(40, None), (40, 5), (10, None)])
def test_the_ring_leaves_the_store_and_the_logits_of_the_generic_eviction(monkeypatch, prompt, question):
    """Budget 12 with 4 sinks: 8 window slots, so 30 decode steps turn the ring almost four times. A prompt of 10
    starts below the budget (the ring starts when the cache first exceeds it); a question fed after compression
    (5 entries in one call) reorders through `keep`, after which the layout is checked again."""
    model = tiny_model("llama")
    method = kvsieve.method("streamingllm", budget=12, n_sink=4)
    ids = random_ids(prompt)
    q = random_ids(question, seed=2) if question else None
    ringed = SieveCache(model, method)
    evict_slot_calls = []
    original = KVStore.evict_slot
    monkeypatch.setattr(KVStore, "evict_slot", lambda self, slot: (evict_slot_calls.append(slot), original(self, slot)))
    tokens, logits = greedy_with_logits(model, ringed, ids, 30, question=q)
    monkeypatch.setattr(StreamingLLMPolicy, "_ring_start", lambda self: None)  # the generic path only
    generic = SieveCache(model, method)
    want_tokens, want_logits = greedy_with_logits(model, generic, ids, 30, question=q)
    assert tokens == want_tokens and torch.equal(logits, want_logits)
    for mine, theirs in zip(_stores(ringed), _stores(generic), strict=True):
        assert mine.length == theirs.length == 12
        assert torch.equal(mine.positions, theirs.positions)  # the same entries in the same slots
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    n_layers = len(_stores(ringed))
    assert len(evict_slot_calls) >= 20 * n_layers  # the ring, not the generic path, did the steps' evictions
    assert set(evict_slot_calls) == set(range(4, 12))  # the window's slots; the sinks' never
    sinks = _stores(ringed)[0].positions[0, 0, :4].tolist()
    assert sinks == [0, 1, 2, 3]


@torch.inference_mode()
def test_a_layout_other_than_the_plain_one_has_no_ring():
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("streamingllm", budget=6, n_sink=2))
    greedy_with_logits(model, cache, random_ids(20), 1)
    policy = cache.layers[0].policy
    store = policy.store
    store.append(store.keys[:, :, -1:].clone(), store.values[:, :, -1:].clone(), 20)  # length k + 1 = 7
    assert policy._ring_start() == 2  # sinks 0, 1; then the window in order
    store._positions[:, :, 2], store._positions[:, :, 3] = 15, 14  # two window entries out of order
    assert policy._ring_start() is None
    store._positions[:, :, 2], store._positions[:, :, 3] = 14, 15
    store._positions[:, 1, 4] += 100  # heads that differ (positions no longer shared)
    assert policy._ring_start() is None


def test_evict_slot_is_evict_of_the_same_slot_everywhere():
    store, twin = KVStore(), KVStore()
    for s in (store, twin):
        s.add_aux("score")
        s.append(torch.arange(2 * 3 * 5 * 4.0).view(2, 3, 5, 4), -torch.arange(2 * 3 * 5 * 4.0).view(2, 3, 5, 4), 7)
        s.aux("score").copy_(torch.arange(30.0).view(2, 3, 5))
    store.evict_slot(1)
    twin.evict(torch.full((2, 3), 1))
    for mine, theirs in [(store.keys, twin.keys), (store.values, twin.values), (store.positions, twin.positions)]:
        assert torch.equal(mine, theirs)
    assert torch.equal(store.aux("score"), twin.aux("score"))
    assert store.length == 4 and store.positions[0, 0].tolist() == [7, 11, 9, 10]
    store.evict_slot(3)  # the last entry: nothing moves
    assert store.length == 3 and store.positions[0, 0].tolist() == [7, 11, 9]
    with pytest.raises(IndexError, match="evict_slot: slot 3 outside the 3 stored entries"):
        store.evict_slot(3)
