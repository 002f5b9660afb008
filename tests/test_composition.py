"""Eviction methods are composed of parts: a priority, rolling eviction, a per-layer schedule (issue 13).

* TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104), written here in a few lines from
  the public parts alone: its kept sets equal an independent float64 reimplementation replayed on the full model
  (step by step, logits too), and known answers on a constructed case.
* H2O with the pyramid schedule: each layer stores the pyramid's share, the mean is the budget, the shares hold
  while decoding; with room for every token it is exactly the full cache.
* PyramidKV is SnapKV + the pyramid; ``rolling`` and ``layer_schedule`` are plain parameters, checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

import kvsieve
from helpers import greedy_with_logits, masked_reference, random_ids, tiny_model, traces_of
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods import (
    AttentionCall,
    EvictionMethod,
    LayerInfo,
    Phase,
    PriorityEvictionPolicy,
    Pyramid,
    param,
    register,
    unregister,
)
from kvsieve.methods.eviction import ROLLING_HELP
from kvsieve.methods.schedules import pyramid_budgets
from kvsieve.ops.scoring import attention_probs, reduce_gqa

N_PROMPT, N_NEW = 48, 10
LOGIT_TOL = 1e-4  # compressed vs masked full cache, fp32 (same math, different kernels): measured ~1e-6


# ------------------------------------------------------------------------------------------ TOVA, in a few lines
class TOVAPolicy(PriorityEvictionPolicy):
    """TOVA's priority: the current (last) query's attention weights over the stored entries, mean over the KV group."""

    def priority(self, call: AttentionCall) -> torch.Tensor:
        scaling = call.scaling if call.scaling is not None else self.info.head_dim**-0.5
        probs = attention_probs(call.query[:, :, -1:], self.store.keys, scaling)  # [B, H, 1, S]: it sees them all
        return reduce_gqa(probs[:, :, 0], self.info.n_kv_heads, "mean").double()


@dataclass
class TOVA(EvictionMethod):
    """Keep the entries the current token attends to most; the lowest leaves at every step (rolling)."""

    name = "tova"
    summary = "Token Omission Via Attention: the current query's attention decides, at every step"
    paper = "arXiv 2401.06104"
    policy = TOVAPolicy
    budget_counts = "entries stored per layer and KV head, held at every decode step"
    shares_prefill = True

    rolling: bool = param(True, ROLLING_HELP)


@pytest.fixture
def tova():
    register(TOVA)
    try:
        yield TOVA
    finally:
        unregister("tova")
    assert "tova" not in {info.name for info in kvsieve.methods()}


def tova_reference(model, context: list[int], n_new: int, k: int):
    """TOVA without kvsieve: the full model with a ``DynamicCache`` and an attention function that masks, per layer
    and KV head, what its own kept sets (plain Python sets) dropped. After each call the current (last) query's
    softmax over the attended entries, in float64 and averaged over the group's query heads, keeps the ``k`` largest.
    Greedy decoding; returns the per layer, per call attended sets (per KV head) and the logits ``[n_new, V]``."""
    kept: dict[int, list[set[int]]] = {}
    attended_sets: dict[int, list[list[set[int]]]] = {}
    gaps = []

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, g = module.layer_idx, module.num_key_value_groups
        n_kv, total, q = key.shape[1], key.shape[2], query.shape[2]
        new = set(range(total - q, total))
        heads = [old | new for old in kept.get(layer, [set()] * n_kv)]
        attended_sets.setdefault(layer, []).append(heads)
        allowed = torch.zeros(1, n_kv, total, dtype=torch.bool)
        for h, entries in enumerate(heads):
            allowed[0, h, sorted(entries)] = True
        causal = torch.arange(total)[None, :] <= (torch.arange(q) + total - q)[:, None]
        mask = (allowed[:, :, None, :] & causal).repeat_interleave(g, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scaling
        )
        kept[layer] = []
        for h, entries in enumerate(heads):
            columns = sorted(entries)
            last = query[0, h * g : (h + 1) * g, -1].double()  # [g, D]: the group's current queries
            weights = (last @ key[0, h, columns].double().T * scaling).softmax(dim=-1).mean(dim=0).tolist()
            ranked = sorted(zip(weights, columns), reverse=True)
            kept[layer].append({position for _, position in ranked[:k]})
            if len(ranked) > k:
                gaps.append(ranked[k - 1][0] - ranked[k][0])
        return out.transpose(1, 2).contiguous(), None

    name = "kvsieve_tova_reference"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        tokens, logits = greedy_with_logits(model, DynamicCache(config=model.config), context, n_new)
    finally:
        model.set_attn_implementation(previous)
    assert min(gaps) > 1e-6, "a near-tie at the eviction boundary: the kept set is not well defined"
    return attended_sets, tokens, logits


@pytest.mark.parametrize(("arch", "k"), [("llama", 12), ("qwen2", 20)])
def test_tova_keeps_what_the_reference_keeps(tova, arch, k):
    model = tiny_model(arch)
    context = random_ids(N_PROMPT)
    cache = SieveCache(model, kvsieve.method("tova", budget=k), trace=True)
    tokens, logits = greedy_with_logits(model, cache, context, N_NEW)
    expected, ref_tokens, ref_logits = tova_reference(model, context, N_NEW, k)
    assert tokens == ref_tokens
    for layer, calls in traces_of(cache).items():
        assert len(calls) == N_NEW  # the prompt, then one call per decode step
        for c, positions in enumerate(calls):
            got = [set(head.tolist()) for head in positions[0]]
            assert got == expected[layer][c], f"layer {layer}, call {c}: TOVA's kept set differs from the reference"
    assert (logits - ref_logits).abs().max().item() < LOGIT_TOL
    assert all(layer.policy.store.length == k for layer in cache.sieve_layers)  # rolling: held at k


def test_tova_known_answers_on_a_constructed_case(tova):
    """Two query heads share one KV head; keys are chosen so that softmax gives the weights below directly (key j is
    (ln pA_j, ln pB_j) and the queries are the unit vectors). Averaged over the group: 0.30, 0.225, 0.225, 0.25, so
    a budget of 2 keeps {0, 3}; head A alone would keep {1, 0}, the maximum over the heads {1, 2}, and the chunk's
    first query (which prefers small keys) {1, 2} as well."""
    p_a = torch.tensor([0.30, 0.44, 0.01, 0.25], dtype=torch.float64)
    p_b = torch.tensor([0.30, 0.01, 0.44, 0.25], dtype=torch.float64)
    keys = torch.stack([p_a.log(), p_b.log()], dim=-1).float()[None, None]  # [1, 1, 4, 2]
    query = torch.tensor([[[[-1.0, -1.0], [1.0, 0.0]], [[-1.0, -1.0], [0.0, 1.0]]]])  # [1, 2 heads, 2 tokens, 2]
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    policy = kvsieve.method("tova", budget=2).make_policy(LayerInfo(0, 1, 2, 1, 2))

    def call(q, phase, first, seen):
        keys_now, values_now = policy.store.keys, policy.store.values
        return AttentionCall(module, q, keys_now, values_now, 1.0, phase, first, seen, {}, lambda positions: None)

    policy.update(keys, torch.zeros_like(keys), 0, Phase.PREFILL_LAST)
    policy.compress(call(query, Phase.PREFILL_LAST, 2, 4))
    assert policy.store.positions[0, 0].sort().values.tolist() == [0, 3]
    # a decode step: the new key (ln 2, ln 0.01) at position 4. Over {0, 3, 4} head A gives 0.118, 0.098, 0.784 and
    # head B 0.536, 0.446, 0.018: means 0.327, 0.272, 0.401, so position 3 leaves.
    new_key = torch.tensor([[[[2.0, 0.01]]]]).log()
    policy.update(new_key, torch.zeros_like(new_key), 4, Phase.DECODE)
    policy.attend(call(torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]), Phase.DECODE, 4, 5))
    assert policy.store.positions[0, 0].sort().values.tolist() == [0, 4]


def test_tova_is_registered_only_inside_its_test(tova):
    assert kvsieve.method("tova").rolling is True
    assert kvsieve.method("tova", rolling=False).rolling is False  # the part composes like any parameter


# ------------------------------------------------------------------------------------------ pyramid schedule
def stored_after(model, method, n: int, n_steps: int = 0) -> tuple[list[int], list[list[int]]]:
    """Entries per KV head each layer stores after the prompt, and after each of ``n_steps`` decode steps."""
    cache = SieveCache(model, method)
    with torch.inference_mode():
        logits = Driver(model, cache).prompt(random_ids(n))
        after = [layer.policy.store.length for layer in cache.sieve_layers]
        steps = []
        for _ in range(n_steps):
            token = torch.tensor([[int(logits.argmax(-1))]])
            logits = model(input_ids=token, **cache_kwargs(model, cache)).logits[:, -1]
            steps.append([layer.policy.store.length for layer in cache.sieve_layers])
    return after, steps


def test_h2o_with_the_pyramid_schedule_stores_the_pyramid_and_holds_it():
    model = tiny_model("llama")
    budget, n = 24, N_PROMPT
    expected = pyramid_budgets(budget, n, 3, 0, 20)  # KVCache-Factory's formula, no window
    assert expected == [47, 24, 1]  # no window: the top layer keeps 24 // 20 entries, the bottom 2 x 24 - 1
    after, steps = stored_after(model, kvsieve.method("h2o", budget=budget, layer_schedule="pyramid"), n, 5)
    assert after == expected and sum(after) == 3 * budget
    assert steps == [expected] * 5  # rolling: each layer holds its own share at every step
    uniform, _ = stored_after(model, kvsieve.method("h2o", budget=budget), n)
    assert uniform == [budget] * 3  # the schedule is what makes the difference
    steep = Pyramid(beta=4, window=2)  # a schedule object with its own parameters
    after, _ = stored_after(model, kvsieve.method("h2o", budget=budget, layer_schedule=steep), n)
    assert after == pyramid_budgets(budget, n, 3, 2, 4) == [41, 24, 7]


def test_pyramid_h2o_logits_equal_the_masked_full_cache():
    model = tiny_model("qwen2")
    context = random_ids(N_PROMPT)
    cache = SieveCache(model, kvsieve.method("h2o", budget=16, layer_schedule="pyramid"), trace=True)
    tokens, logits = greedy_with_logits(model, cache, context, N_NEW)
    assert cache.stored_tokens() == pyramid_budgets(16, N_PROMPT, 3, 0, 20) == [32, 16, 0]  # the top: 16 // 20
    reference = masked_reference(model, traces_of(cache), context, tokens)
    assert (logits - reference).abs().max().item() < LOGIT_TOL


def test_pyramid_h2o_with_room_for_every_token_is_the_full_cache():
    model = tiny_model("llama")
    context = random_ids(N_PROMPT)
    budget = N_PROMPT + N_NEW  # rolling: nothing is evicted only if the budget holds the generated tokens too
    cache = SieveCache(model, kvsieve.method("h2o", budget=budget, layer_schedule="pyramid"))
    tokens, logits = greedy_with_logits(model, cache, context, N_NEW)
    full = DynamicCache(config=model.config)
    ref_tokens, ref_logits = greedy_with_logits(model, full, context, N_NEW)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    stored = N_PROMPT + N_NEW - 1  # the last token's K/V is never fed
    assert cache.stored_tokens() == [stored] * 3 == [full.get_seq_length(i) for i in range(3)]
    assert [layer.policy.k for layer in cache.sieve_layers] == [budget] * 3


def test_pyramidkv_is_snapkv_with_the_pyramid_schedule():
    model = tiny_model("llama")
    context = random_ids(N_PROMPT)

    def kept(method):
        cache = SieveCache(model, method)
        with torch.inference_mode():
            Driver(model, cache).prompt(context)
        return [layer.policy.store.positions.sort(dim=-1).values for layer in cache.sieve_layers]

    pyramid = kept(kvsieve.method("pyramidkv", budget=24, window_size=4, beta=4))
    composed = kept(kvsieve.method("snapkv", budget=24, window_size=4, layer_schedule=Pyramid(beta=4, window=4)))
    assert all(torch.equal(a, b) for a, b in zip(pyramid, composed))
    assert [p.shape[-1] for p in pyramid] == [39, 24, 9]
    by_name = kept(kvsieve.method("snapkv", budget=24, window_size=8, layer_schedule="pyramid"))  # beta 20
    default = kept(kvsieve.method("pyramidkv", budget=24))
    assert all(torch.equal(a, b) for a, b in zip(by_name, default))


def test_a_callable_schedule_sets_each_layer():
    model = tiny_model("llama")

    def staircase(average: int, n_prompt: int, n_layers: int, layer_idx: int) -> int:
        return average + 4 * (layer_idx - 1)  # 3 layers: the mean stays the average

    after, _ = stored_after(model, kvsieve.method("streamingllm", budget=20, layer_schedule=staircase), N_PROMPT)
    assert after == [16, 20, 24]


def test_streamingllm_one_shot_appends_after_the_prompt():
    model = tiny_model("llama")
    after, steps = stored_after(model, kvsieve.method("streamingllm", budget=20, rolling=False), N_PROMPT, 3)
    assert after == [20] * 3 and steps == [[21] * 3, [22] * 3, [23] * 3]


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("h2o", dict(layer_schedule="cubic"), ValueError, "layer_schedule must be one of 'uniform', 'pyramid' or a"),
        ("h2o", dict(rolling="yes"), TypeError, "rolling must be a bool"),
        ("snapkv", dict(rolling=True), ValueError, "rolling=True: snapkv scores the entries once"),
        ("pyramidkv", dict(rolling=True), ValueError, "rolling=True: pyramidkv scores the entries once"),
        ("pyramidkv", dict(layer_schedule="uniform"), ValueError, "layer_schedule must be 'pyramid' for pyramidkv"),
    ],
)
def test_bad_parts_name_themselves(name, params, error, match):
    with pytest.raises(error, match=match):
        kvsieve.method(name, **params)


def test_a_schedule_that_gives_a_bad_size_is_refused_at_compression():
    model = tiny_model("llama")
    for bad in (-1, 2.5):
        method = kvsieve.method("h2o", budget=8, layer_schedule=lambda *args, v=bad: v)
        with pytest.raises(ValueError, match=f"layer_schedule gave layer 0 {bad} entries; it must return an int >= 0"):
            stored_after(model, method, N_PROMPT)
    with pytest.raises(ValueError, match="beta must be in"):
        Pyramid(beta=0)


def test_the_pyramid_keeps_the_mean_on_many_prompts():
    """The pyramid's mean over 3 layers is the budget for every budget below the prompt (KVCache-Factory's integer
    step divides evenly on an odd layer count), and no layer goes below the window or above the prompt."""
    for n, window in itertools.product((20, 48, 200), (0, 4)):
        for average in range(1, n):
            shares = pyramid_budgets(average, n, 3, window, 20)
            assert sum(shares) == 3 * average, (n, window, average)
            assert all(min(window, average) <= s <= n for s in shares), (n, window, average, shares)
