"""Shared prefill: the caches one shared forward builds equal, bit for bit, those of each method's own prefill.

For every method that compresses after prefill, at real budgets, in one shared prefill (two H2O budgets among them,
so private score tensors matter): stored keys, values, positions and auxiliary scores per layer, the ``seen``
count, the measured sizes, the attended-positions traces and the next logits (greedy decode) are equal to a separate
``kvsieve.generate.prefill``; query-aware (question inside the compressed prompt) and query-agnostic (question chunk
after compression, or before it for methods that compress after the question), whole and chunked prefill, on Llama
and on Gemma-3 (whose sliding-window layers are copied from the shared forward).
"""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import random_ids, tiny_model
from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods.base import _REGISTRY
from kvsieve.prefill_sharing import check_shareable, copy_cache, shared_prefill, shares_prefill

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

N_CONTEXT, N_QUESTION, N_NEW = 160, 12, 6

# Every method that compresses after prefill, at budgets that evict (the context is 160 tokens).
EARLY = [
    ("snapkv", {"budget": 40, "window_size": 8}),
    ("pyramidkv", {"budget": 0.3, "window_size": 8}),
    ("h2o", {"budget": 50}),
    ("h2o", {"budget": 0.5, "recent_ratio": 0.25}),
    ("streamingllm", {"budget": 33}),
    ("refreshkv", {"budget": 20, "stride": 2}),
    ("nacl", {"budget": 40, "proxy_source": "last"}),
]
# Methods that compress after a separately fed question (its tokens are the proxies).
LATE = [("nacl", {"budget": 40}), ("nacl", {"budget": 0.5, "seed": 3})]
SHAREABLE = {"snapkv", "pyramidkv", "h2o", "streamingllm", "nacl", "refreshkv"}


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def model(request):
    return tiny_model(request.param)


def build(cases):
    """The methods of ``cases`` that can share (test_shareable_methods_are_the_one_shot_ones checks which can)."""
    return [m for m in (kvsieve.method(name, **params) for name, params in cases) if shares_prefill(m)]


def assert_same_cache(shared: SieveCache, alone: SieveCache, what: str, statistics: bool = True) -> None:
    assert len(shared.layers) == len(alone.layers)
    for index, (a, b) in enumerate(zip(shared.layers, alone.layers)):
        where = f"{what}, layer {index}"
        if not isinstance(b, SieveLayer):  # sliding-window layer: the model's own cache
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), where
            continue
        sa, sb = a.policy.store, b.policy.store
        assert sa.length == sb.length, where
        assert torch.equal(sa.keys, sb.keys), f"{where}: keys"
        assert torch.equal(sa.values, sb.values), f"{where}: values"
        assert torch.equal(sa.positions, sb.positions), f"{where}: positions"
        assert sorted(sa._aux_dtypes) == sorted(sb._aux_dtypes), where
        for name in sb._aux_dtypes:
            assert torch.equal(sa.aux(name), sb.aux(name)), f"{where}: aux {name}"
        assert a.seen == b.seen, where
        assert a.policy.stored_length() == b.policy.stored_length(), where
        assert a.policy.kv_bytes() == b.policy.kv_bytes(), where
        if not statistics:
            continue
        assert (a.meter.stored_after_prefill, a.meter.bytes_after_prefill, a.meter.bytes_before_compress) == (
            b.meter.stored_after_prefill,
            b.meter.bytes_after_prefill,
            b.meter.bytes_before_compress,
        ), where
        assert len(a.meter.trace) == len(b.meter.trace), where
        assert all(torch.equal(x, y) for x, y in zip(a.meter.trace, b.meter.trace)), f"{where}: attended positions"


@torch.inference_mode()
def greedy(model, cache, logits, n):
    """Greedy tokens and their logits from a prefilled cache."""
    out = []
    for step in range(n):
        out.append(logits.clone())
        if step + 1 < n:
            token = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=token, **cache_kwargs(model, cache)).logits[:, -1]
    return torch.cat(out)


@pytest.mark.parametrize("chunk_size", [None, 64])
@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_shared_equals_separate(model, mode, chunk_size):
    context, question = random_ids(N_CONTEXT), random_ids(N_QUESTION, seed=7)
    if mode == "query_aware":  # the question is part of the compressed prompt
        groups = [(build(EARLY + LATE), context + question, None)]
    else:  # the question follows as its own chunk: before compression for LATE, after it for EARLY
        groups = [(build(EARLY), context, question), (build(LATE), context, question)]
    with torch.inference_mode():
        for methods, prompt, q in groups:
            if not methods:
                continue
            result = shared_prefill(model, methods, prompt, q, chunk_size=chunk_size, trace=True)
            assert len(result.caches) == len(result.logits) == len(result.method_s) == len(methods)
            alone_full = SieveCache(model, kvsieve.method("full"), trace=True)
            full_logits = Driver(model, alone_full).prompt(prompt, q or [], chunk_size=chunk_size)
            assert torch.equal(result.full_logits, full_logits)
            # With methods that compress after the question, the shared forward's prompt ends with the question:
            # the full cache holds the same entries, but counts the question as prompt in its statistics.
            late = q is not None and methods[0].compress_after_question
            assert_same_cache(result.full, alone_full, "full", statistics=not late)
            for method, cache, logits in zip(methods, result.caches, result.logits):
                what = f"{method} ({mode}, chunk {chunk_size})"
                alone = SieveCache(model, method, trace=True)
                alone_logits = Driver(model, alone).prompt(prompt, q or [], chunk_size=chunk_size)
                assert torch.equal(logits, alone_logits), what
                assert cache.question_span == alone.question_span, what
                stored = [layer.policy.stored_length() for layer in alone.sieve_layers]
                assert min(stored) < len(prompt) or method.name == "refreshkv", f"{what}: nothing was evicted"
                assert_same_cache(cache, alone, what)
                # decoding on: the same logits step by step (rolling evictions included)
                assert torch.equal(greedy(model, cache, logits, N_NEW), greedy(model, alone, alone_logits, N_NEW)), what
                assert_same_cache(cache, alone, f"{what} after decoding")


def test_shareable_methods_are_the_one_shot_ones():
    eligible = {name for name, entry in _REGISTRY.items() if shares_prefill(kvsieve.method(name))}
    presets = {name for name, entry in _REGISTRY.items() if entry.cls.name != name}
    assert eligible - presets == SHAREABLE, "set `shares_prefill = True` on the one-shot methods' classes"
    for name in ("infllm", "actqkv", "full"):
        if name in _REGISTRY:
            assert not shares_prefill(kvsieve.method(name))


def test_refuses_methods_with_their_own_prefill(model):
    with pytest.raises(ValueError, match="infllm cannot share a prefill"):
        check_shareable([kvsieve.method("snapkv"), kvsieve.method("infllm")])
    snapkv, nacl = kvsieve.method("snapkv", budget=8), kvsieve.method("nacl", budget=8)
    if shares_prefill(nacl):  # with a separate question, NACL compresses after it, SnapKV before it
        with pytest.raises(ValueError, match="nacl compress after the question"):
            shared_prefill(model, [snapkv, nacl], random_ids(40), [5, 6])
    with pytest.raises(ValueError, match="empty"):
        shared_prefill(model, build([("snapkv", {"budget": 8})]), [], None)


def test_copies_are_independent(model):
    """Several questions on one compressed context: each reads its own copy; the original is untouched."""
    context = random_ids(N_CONTEXT)
    questions = [random_ids(N_QUESTION, seed=s) for s in (11, 12)]
    method = kvsieve.method("h2o", budget=40)  # rolling: every step evicts and rescores
    with torch.inference_mode():
        result = shared_prefill(model, [method], context)
        base = result.caches[0]
        before = [layer.policy.store.keys.clone() for layer in base.sieve_layers]
        for q in questions:
            copy = copy_cache(base)
            logits = Driver(model, copy).question(q)
            assert copy.question_span == (N_CONTEXT, N_CONTEXT + N_QUESTION)
            got = greedy(model, copy, logits, N_NEW)
            alone = SieveCache(model, method)
            logits = Driver(model, alone).prompt(context, q)
            assert torch.equal(got, greedy(model, alone, logits, N_NEW))
        after = [layer.policy.store.keys for layer in base.sieve_layers]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(layer.seen == N_CONTEXT for layer in base.sieve_layers)


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_the_attention_runs_once_per_chunk_however_many_h2o_budgets_share_it(monkeypatch, chunk_size):
    """Two H2O budgets and SnapKV: each layer's attention over each prompt chunk is computed once, by the full
    cache, and both H2O caches score from its log-sum-exp (their hooks no longer attend on their own)."""
    import kvsieve.ops.attention as attention_ops
    import kvsieve.ops.scored_attention as scored_ops

    model = tiny_model("llama")
    calls = {"prefill": 0}
    sdpa, flash = attention_ops.sdpa_attention_forward, scored_ops._flash_for_cpu

    def counted(real):
        def run(*args, **kwargs):
            calls["prefill"] += args[1].shape[2] > 1  # a prompt chunk's queries, not a decode step's one
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(attention_ops, "sdpa_attention_forward", counted(sdpa))
    monkeypatch.setattr(scored_ops, "_flash_for_cpu", counted(flash))
    methods = build([("h2o", {"budget": 50}), ("h2o", {"budget": 0.5, "recent_ratio": 0.25}), EARLY[0]])
    with torch.inference_mode():
        result = shared_prefill(model, methods, random_ids(N_CONTEXT), chunk_size=chunk_size)
    n_chunks = 1 if chunk_size is None else -(-N_CONTEXT // chunk_size)
    assert calls["prefill"] == len(result.full.sieve_layers) * n_chunks
    with torch.inference_mode():  # H2O alone: its observe attends, its attend returns that output
        calls["prefill"] = 0
        Driver(model, SieveCache(model, methods[0])).prefill(random_ids(N_CONTEXT), chunk_size)
    assert calls["prefill"] == len(result.full.sieve_layers) * n_chunks
