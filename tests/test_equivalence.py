"""Exactness of the seam on tiny random-init models of every supported architecture.

* A budget that evicts nothing reproduces plain ``model.generate`` with a ``DynamicCache`` token for token.
* Under a real budget, logits equal the full cache with exactly the evicted entries masked, per layer, head and
  step (the masked reference), through one-shot prefill, chunked prefill and a question chunk after compression.
* The negative control: a layer reporting its stored length instead of the logical one is caught.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import TINY_CONFIGS, IdTokenizer, greedy_with_logits, masked_reference, random_ids, tiny_model, traces_of
from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import Phase

N_PROMPT, N_NEW = 48, 10
# Rolling methods (StreamingLLM, H2O) hold the cap during decode too: "nothing evicted" needs room for every token.
NO_EVICTION_BUDGET = N_PROMPT + N_NEW + 2
METHODS = ["full", "streamingllm", "snapkv", "h2o", "pyramidkv"]
# Logits of the compressed cache vs the masked full cache: same math, different kernels (sdpa vs masked sdpa)
# and summation order; fp32 differences are ~1e-6.
LOGIT_TOL = 1e-4


def _params(name: str, budget: int) -> dict:
    return {} if name == "full" else {"budget": budget}


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("name", METHODS)
def test_no_eviction_equals_model_generate(arch_model, name):
    arch, model = arch_model
    ids = torch.tensor([random_ids(N_PROMPT)])
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=N_NEW, do_sample=False, attention_mask=mask, pad_token_id=0)
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    cache = SieveCache(model, kvsieve.method(name, **_params(name, NO_EVICTION_BUDGET)))
    ours = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert torch.equal(ours, reference), f"{arch}/{name} differs from model.generate"
    # and through kvsieve's own loop, chunked
    tokens, _ = greedy_with_logits(
        model,
        SieveCache(model, kvsieve.method(name, **_params(name, NO_EVICTION_BUDGET))),
        random_ids(N_PROMPT),
        N_NEW,
        chunk_size=20,
    )
    assert tokens == reference[0, N_PROMPT:].tolist()


def test_no_eviction_is_bit_identical_in_logits():
    model = tiny_model("llama")
    ctx = random_ids(N_PROMPT)
    _, ref_logits = greedy_with_logits(model, DynamicCache(config=model.config), ctx, N_NEW)
    for name in METHODS:
        _, logits = greedy_with_logits(
            model, SieveCache(model, kvsieve.method(name, **_params(name, 10_000))), ctx, N_NEW
        )
        assert torch.equal(logits, ref_logits), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "h2o", "pyramidkv"])
@pytest.mark.parametrize("mode", ["one_chunk", "chunked", "question"])
def test_compressed_equals_masked_reference(arch, name, mode):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    question = random_ids(6, seed=7) if mode == "question" else None
    chunk = 16 if mode == "chunked" else None
    params = {"budget": 20}
    if name in ("snapkv", "pyramidkv"):
        params["window_size"] = 4
    cache = SieveCache(model, kvsieve.method(name, **params), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW, question=question, chunk_size=chunk)
    assert all(layer.meter.stored_after_prefill < N_PROMPT for layer in cache.sieve_layers)  # something was evicted
    reference = masked_reference(model, traces_of(cache), ctx, tokens, question=question, chunk_size=chunk)
    diff = (logits - reference).abs().max().item()
    assert diff < LOGIT_TOL, f"{arch}/{name}/{mode}: max |dlogit| = {diff:.2e}"


def test_masked_reference_detects_a_wrong_mask():
    """The reference is sharp: claiming one more evicted entry than the run used changes the logits."""
    model = tiny_model("llama")
    ctx = random_ids(N_PROMPT)
    cache = SieveCache(model, kvsieve.method("snapkv", budget=20, window_size=4), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW)
    traces = traces_of(cache)
    for layer_traces in traces.values():
        for i, positions in enumerate(layer_traces):
            if positions.shape[-1] < N_PROMPT:  # decode calls: drop the first attended entry of head 0
                layer_traces[i] = positions[:, :, 1:]
    reference = masked_reference(model, traces, ctx, tokens)
    assert (logits - reference).abs().max().item() > 1e-3


def test_negative_control_stored_length_breaks_positions(monkeypatch):
    """A layer that reports its stored length (naive eviction) shifts every later RoPE position: caught."""
    model = tiny_model("llama")
    ctx = random_ids(N_PROMPT)
    good = SieveCache(model, kvsieve.method("snapkv", budget=20, window_size=4), trace=True)
    tokens, good_logits = greedy_with_logits(model, good, ctx, N_NEW)
    reference = masked_reference(model, traces_of(good), ctx, tokens)
    assert (good_logits - reference).abs().max().item() < LOGIT_TOL

    monkeypatch.setattr(SieveLayer, "get_seq_length", lambda self: self.policy.stored_length())
    monkeypatch.setattr(SieveLayer, "get_mask_sizes", lambda self, q: (self.policy.stored_length() + q, 0))
    naive = SieveCache(model, kvsieve.method("snapkv", budget=20, window_size=4), trace=True)
    naive_tokens, naive_logits = greedy_with_logits(model, naive, ctx, N_NEW)
    naive_reference = masked_reference(model, traces_of(naive), ctx, naive_tokens)
    # step 0 comes from the prefill (positions still right); every later step is at a wrong position
    assert (naive_logits[1:] - naive_reference[1:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "h2o"])
def test_stored_sizes_are_the_budget_and_bytes_are_real(name):
    model = tiny_model("qwen2")
    out = kvsieve.generate(
        model, IdTokenizer(), random_ids(N_PROMPT), method=kvsieve.method(name, budget=0.25), max_new_tokens=5
    )
    budget = round(0.25 * N_PROMPT)
    assert out.stats.kv_stored_tokens_per_layer == [budget] * 3
    assert out.stats.kv_stored_tokens == budget
    n_kv, head_dim, itemsize = 2, 16, 4
    assert out.stats.kv_bytes == 3 * budget * n_kv * head_dim * 2 * itemsize
    assert out.stats.kv_bytes_full == 3 * N_PROMPT * n_kv * head_dim * 2 * itemsize


def test_kv_bytes_match_the_tensors():
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("h2o", budget=17))
    greedy_with_logits(model, cache, random_ids(N_PROMPT), 4)
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.kv_bytes() == real
    assert all(layer.keys.shape[2] == 17 for layer in cache.layers)


def test_pyramidkv_stores_its_schedule():
    from kvsieve.methods.pyramidkv import pyramid_budgets

    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("pyramidkv", budget=24, window_size=4, beta=4))
    greedy_with_logits(model, cache, random_ids(N_PROMPT), 3)
    schedule = pyramid_budgets(24, N_PROMPT, 3, 4, 4)
    # stored after prefill + the 2 decoded tokens appended (one-shot method)
    assert [s - 2 for s in cache.stored_tokens()] == schedule
    assert schedule[0] > schedule[1] > schedule[2]
    assert abs(sum(schedule) / 3 - 24) <= 1


def test_gemma3_sliding_layers_keep_their_own_cache():
    model = tiny_model("gemma3_text")
    cache = SieveCache(model, kvsieve.method("snapkv", budget=20, window_size=4))
    greedy_with_logits(model, cache, random_ids(N_PROMPT), 3)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "SieveLayer", "DynamicSlidingWindowLayer", "SieveLayer"]
    stored = cache.stored_tokens()
    assert stored[1] == stored[3] == 20 + 2  # compressed, then two decoded tokens appended
    assert stored[0] <= 16  # the sliding window's own bound


def test_decode_appends_write_in_place():
    """No torch.cat per decode step: the key buffer stays the same allocation while capacity lasts."""
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("full"), reserve=32)
    ctx = random_ids(N_PROMPT)
    model(input_ids=torch.tensor([ctx]), **cache_kwargs(model, cache))
    layer = cache.layers[0]
    pointer = layer.policy.store._keys.data_ptr()
    for token in range(5):
        model(input_ids=torch.tensor([[token + 3]]), **cache_kwargs(model, cache))
    assert layer.policy.store._keys.data_ptr() == pointer
    assert layer.get_seq_length() == N_PROMPT + 5


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streamingllm"])
def test_batch_of_equal_length_prompts_equals_each_prompt_alone(name):
    """Every tensor keeps its batch dimension: selection is per batch row and KV head."""
    model = tiny_model("qwen2")
    prompts = torch.tensor([random_ids(N_PROMPT, seed=1), random_ids(N_PROMPT, seed=2)])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    def run(ids):
        cache = SieveCache(model, kvsieve.method(name, budget=20))
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **kw)

    together = run(prompts)
    for row in range(2):
        assert torch.equal(together[row], run(prompts[row : row + 1])[0])


DROP_METHODS = {
    "full": {},
    "snapkv": dict(budget=16),
    "h2o": dict(budget=16),
    "nacl": dict(budget=16),
    "refreshkv": dict(budget=16),
    "infllm": dict(n_init=4, n_local=32, block_size=8, exc_block_size=16, topk=2),
    "actqkv": dict(n_init=4, n_local=32, block_size=8, exc_block_size=16, topk=2, min_blocks=1),
}


@pytest.mark.parametrize("name", DROP_METHODS)
def test_a_dropped_cache_is_freed_at_once(name):
    """No reference cycle through a cache: its tensors go when the last reference does, not whenever Python's
    cyclic collector runs (a sweep of 25 caches per sample grew by GBs before layers stopped pointing back)."""
    import copy
    import gc
    import weakref

    model = tiny_model("llama")
    ids = torch.tensor([random_ids(100)])
    enabled = gc.isenabled()
    gc.disable()
    try:
        cache = SieveCache(model, kvsieve.method(name, **DROP_METHODS[name]))
        with torch.inference_mode():
            model(input_ids=ids, **cache_kwargs(model, cache))
            copied = copy.deepcopy(cache)  # copies stay independent: their layers answer to the copy alone
            with cache.forward_as(Phase.DECODE):  # set through the cache, read by every layer
                assert all(layer.next_phase is Phase.DECODE for layer in cache.sieve_layers)
                assert all(layer.next_phase is None for layer in copied.sieve_layers)
                model(input_ids=ids[:, :2], **cache_kwargs(model, cache))
            assert all(layer.next_phase is None for layer in cache.sieve_layers)  # for that forward only
        refs = [weakref.ref(cache), weakref.ref(copied)]
        del cache, copied
        assert all(ref() is None for ref in refs)
    finally:
        if enabled:
            gc.enable()
