"""ActQKV (arXiv 2502.13542; the released code's behaviour) on the InfLLM substrate.

* Nothing leaves the window: the full cache's tokens, on every architecture; under a real memory, the per-query
  reference of ``test_infllm`` (the attention is InfLLM's, whatever blocks ActQKV picks).
* Warm-up: the probe is InfLLM's mean, and with InfLLM's scoring and block count ActQKV retrieves exactly what
  InfLLM retrieves. After warm-up a token whose query deviates strongly dominates the probe; the statistics
  follow the released update rule.
* The dynamic cut-off: counts within their clamps, the pool spent layer by layer as the spec describes (checked
  against the recorded entropies of a real run), uniform with equal entropies.
* The question term, state per cache (not per process), and the default model beyond its window.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import TINY_CONFIGS, greedy_with_logits, random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.actqkv import BlockPool, find_span, normalized_entropy
from kvsieve.methods.base import Phase, PromptLayout
from kvsieve.ops.activation_bias import ActivationStats
from test_infllm import LOGIT_TOL, N_NEW, N_PROMPT, SMALL, _policy, passkey_prompt, run_against_reference

DYNAMIC = dict(SMALL, min_blocks=2, max_blocks=6, entropy_window=4)


def _call(phase):
    return type("Call", (), {"phase": phase, "question_span": None, "first_position": 0})()


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_nothing_leaves_the_window_equals_full(arch):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    ref_tokens, ref_logits = greedy_with_logits(model, DynamicCache(config=model.config), ctx, N_NEW)
    method = kvsieve.method("actqkv", n_init=4, n_local=64, block_size=8, topk=2, exc_block_size=16, warmup_calls=2)
    tokens, logits = greedy_with_logits(model, SieveCache(model, method), ctx, N_NEW, chunk_size=20)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < LOGIT_TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equals_the_per_query_reference(arch):
    method = kvsieve.method("actqkv", **DYNAMIC, warmup_calls=6)
    layout = PromptLayout(question=(2, 10))
    cache, _, diff = run_against_reference(tiny_model(arch), method, n_prompt=160, layout=layout)
    policy = cache.sieve_layers[0].policy
    assert policy.activation.count > 6 and policy.question is not None  # past warm-up, with a question term
    assert diff < LOGIT_TOL, f"{arch}: max |dlogit| = {diff:.2e}"


# ----------------------------------------------------------------------------------- the probe query
def test_warmup_retrieves_exactly_what_infllm_retrieves():
    model = tiny_model("llama")
    ctx = random_ids(160)
    infllm = SieveCache(model, kvsieve.method("infllm", **SMALL), trace=True)
    ref_tokens, ref_logits = greedy_with_logits(model, infllm, ctx, N_NEW, chunk_size=40)
    method = kvsieve.method("actqkv", **SMALL, similarity="dot", dynamic_topk=False, warmup_calls=1000)
    act = SieveCache(model, method, trace=True)
    tokens, logits = greedy_with_logits(model, act, ctx, N_NEW, chunk_size=40)
    assert act.shared["actqkv"].activation.count <= method.warmup_calls  # still warming up
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    for a, b in zip(infllm.sieve_layers, act.sieve_layers):
        ta, tb = a.meter.trace, b.meter.trace
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    # the default (cosine) policy's probe is InfLLM's mean too while warming up
    policy, _ = _policy(kvsieve.method("actqkv", **SMALL))
    q_mem = torch.randn(1, 4, 8, 16)
    assert torch.equal(policy.probe(q_mem), q_mem.float().mean(dim=2).reshape(1, -1))


def test_a_one_token_window_probes_with_its_query_exactly_as_the_weighted_formula_does():
    """A decode step's window holds one token: its weight ``b / b`` is exactly 1, so the probe is its query (the
    statistics are updated all the same) -- bit for bit the general weighted sum."""
    policy, _ = _policy(kvsieve.method("actqkv", **SMALL, warmup_calls=3))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        policy.probe(torch.randn(1, 4, 16, 16, generator=g))
    twin = copy.deepcopy(policy.activation)
    for _ in range(3):
        q_mem = torch.randn(1, 4, 1, 16, generator=g) * 3
        flat = q_mem.permute(0, 2, 1, 3).reshape(1, 1, 64)
        assert twin.update(flat)  # past warm-up: weighted
        general = (twin.bias_weights(flat)[..., None] * flat).sum(dim=1)
        assert torch.equal(policy.probe(q_mem), general)
        assert torch.equal(policy.activation.mean, twin.mean) and torch.equal(policy.activation.var, twin.var)
    assert policy.weighted_windows == 3


def test_one_token_windows_probe_with_their_query_and_are_counted_in_warm_up_and_after():
    """A decode step's probe is its query whether or not the statistics weigh it yet; every window counts, the
    first ever included (no statistics to defer it to), and only windows past the warm-up count as weighted."""
    policy, _ = _policy(kvsieve.method("actqkv", **SMALL, warmup_calls=3))
    g = torch.Generator().manual_seed(2)
    for i in range(5):
        q_mem = torch.randn(1, 4, 1, 16, generator=g)
        assert torch.equal(policy.probe(q_mem), q_mem.mean(dim=2).reshape(1, -1))
        assert policy.activation.count == i + 1
    assert policy.weighted_windows == 1  # the fifth: 4 windows seen before it, past the warm-up of 3
    twin = ActivationStats(horizon=kvsieve.method("actqkv").stats_horizon, warmup=3)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        twin.update(torch.randn(1, 4, 1, 16, generator=g).reshape(1, 1, 64))
    assert torch.equal(policy.activation.mean, twin.mean) and torch.equal(policy.activation.var, twin.var)


def test_after_warmup_a_deviating_token_dominates_the_probe():
    policy, _ = _policy(kvsieve.method("actqkv", **SMALL, warmup_calls=20))
    g = torch.Generator().manual_seed(0)
    for _ in range(21):
        policy.probe(torch.randn(1, 4, 16, 16, generator=g))
    q_mem = torch.randn(1, 4, 16, 16, generator=g)
    q_mem[:, :, 5] += 8.0  # token 5's query (all heads) sits far from the statistics
    flat = q_mem.permute(0, 2, 1, 3).reshape(1, 16, 64)
    weights = policy.activation.bias_weights(flat)
    probe = policy.probe(q_mem)
    weights_after = policy.activation.bias_weights(flat)  # the probe's own update, then the same formula
    assert weights_after.argmax().item() == 5 and weights_after[0, 5] > 0.6
    assert abs(weights_after.sum().item() - 1) < 1e-5 and weights[0, 5] > 0.6
    assert torch.allclose(probe, (weights_after[..., None] * flat).sum(dim=1), atol=1e-5)
    cos_token5 = torch.nn.functional.cosine_similarity(probe, flat[:, 5]).item()
    cos_mean = torch.nn.functional.cosine_similarity(probe, flat.mean(dim=1)).item()
    assert cos_token5 > 0.9 and cos_token5 > cos_mean


def test_statistics_follow_the_released_update_rule():
    """A float64 transcription of the code's ``activate``: mean, variance and the bias weights, call by call."""
    horizon, warmup = 3, 2
    stats = ActivationStats(horizon=horizon, warmup=warmup)
    g = torch.Generator().manual_seed(1)
    mean = var = None
    for count, c in enumerate([8, 5, 1, 8, 3, 8, 1, 6]):
        h = torch.randn(1, c, 12, generator=g, dtype=torch.float64) * 2 + 1
        h_u, h_v = h.mean(dim=1), h.var(dim=1, unbiased=False)
        if var is None:
            var, mean = h_v / (c - 1) * c, h_u
        else:
            n = count if count <= horizon else horizon
            var = (var * (n - 1.0 / c) + h_v + (h_u - mean) ** 2 / (1 + 1.0 / n)) / (n + 1 - 1.0 / c)
            mean = (mean * n + h_u) / (n + 1.0)
        expect_uniform = count <= warmup
        weights = stats.token_weights(h.float())
        assert torch.allclose(stats.mean.double(), mean, atol=1e-5) and torch.allclose(
            stats.var.double(), var, atol=1e-4
        )
        if expect_uniform:
            assert weights is None
        else:
            dev = ((h - mean[:, None]) ** 2 / (var + var.mean() / 100)[:, None]).mean(dim=-1)
            assert torch.allclose(weights.double(), dev / dev.sum(), atol=1e-5)


@pytest.mark.parametrize("max_pending", [256, 7])
def test_one_token_windows_folded_later_follow_the_recurrence(monkeypatch, max_pending):
    """Decode steps' one-token windows are folded in when the statistics are next read (`ActivationStats._fold`),
    up to ``max_pending`` at a time: the mean and variance equal the recurrence run window by window (0 pending),
    across the horizon's cap and a warm-up, within float32 rounding; the count and the weighting at once."""
    g = torch.Generator().manual_seed(3)
    windows = [8, *[1] * 40, 5, *[1] * 300, 6, 1, 1]
    inputs = [torch.randn(2, c, 24, generator=g) * 2 + 1 for c in windows]

    def run(pending: int) -> tuple[ActivationStats, list]:
        monkeypatch.setattr(ActivationStats, "max_pending", pending)
        stats, seen = ActivationStats(horizon=30, warmup=20), []
        for h in inputs:
            weighted = stats.update(h)
            seen.append((weighted, stats.count))
            if h.shape[1] > 1:  # a prompt window reads the statistics: its weights
                seen.append(stats.bias_weights(h))
        return stats, seen

    deferred, seen = run(max_pending)
    assert len(deferred._pending) == 2 and deferred._mean is not None  # the last two: not folded yet
    mean, var = deferred.mean, deferred.var  # folded on reading
    reference, seen_reference = run(0)
    assert torch.allclose(mean, reference.mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(var, reference.var, rtol=1e-5, atol=1e-6)
    for got, want in zip(seen, seen_reference):
        assert got == want if isinstance(got, tuple) else torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_decode_with_folded_statistics_generates_what_the_window_by_window_one_does(monkeypatch):
    """In the model: the greedy tokens and the statistics of an ActQKV decode equal those of the recurrence run
    at every step (the pending queries are the steps' own, untouched by what follows)."""
    model = tiny_model("llama")
    method = kvsieve.method("actqkv", **DYNAMIC, warmup_calls=4)
    runs = []
    for pending in (ActivationStats.max_pending, 0):
        monkeypatch.setattr(ActivationStats, "max_pending", pending)
        cache = SieveCache(model, method)
        tokens, logits = greedy_with_logits(model, cache, random_ids(N_PROMPT), 12, chunk_size=20)
        runs.append((tokens, logits, cache.sieve_layers[1].policy.activation))
    (tokens, logits, stats), (ref_tokens, ref_logits, ref_stats) = runs
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() < LOGIT_TOL
    assert stats.count == ref_stats.count and stats._pending  # the decode left its steps pending
    assert torch.allclose(stats.mean, ref_stats.mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.var, ref_stats.var, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- the dynamic cut-off
def _expected_split(entropy_means, topk, n_blocks, min_blocks, max_blocks):
    remaining = topk * len(entropy_means)
    out = []
    for layer, e in enumerate(entropy_means):
        share = e / sum(entropy_means[layer:]) * remaining
        k = max(min(round(share), min(n_blocks, max_blocks)), min(n_blocks, min_blocks))
        remaining -= k
        out.append(k)
    return out


def test_the_entropy_is_the_released_formula_up_to_float_rounding():
    """``-sum p log(p + 1e-10) / log N``, batch mean (the code's), for flat, peaked and underflowing score rows."""
    torch.manual_seed(0)
    rows = [torch.randn(3, 111), torch.randn(2, 46) * 40, torch.tensor([[0.0, 200.0, -200.0, 5.0]]), torch.zeros(1, 7)]
    for scores in rows:
        p = scores.double().softmax(dim=-1)
        released = float((-(p * (p + 1e-10).log()).sum(dim=-1) / math.log(scores.shape[1])).mean())
        assert normalized_entropy(scores) == pytest.approx(released, rel=1e-6, abs=1e-7)
    assert normalized_entropy(torch.zeros(1, 7)) == pytest.approx(1.0, rel=1e-6)


def test_the_pools_running_sums_follow_the_windows_of_samples():
    pool = BlockPool(topk=10, min_blocks=1, max_blocks=20, window=5)
    for _ in range(3):
        pool.add_layer()
    values = torch.rand(40, 3, generator=torch.Generator().manual_seed(1)).tolist()
    for step, row in enumerate(values):
        for layer, e in enumerate(row):
            pool.record(layer, e)
        for layer in range(3):
            window = [r[layer] for r in values[max(0, step - 4) : step + 1]]
            assert pool.sums[layer] == pytest.approx(sum(window), rel=1e-12)
        assert pool.ready() == (step >= 4)


def test_pool_split_clamps_and_uniform_cases():
    entropies = [0.2, 0.9, 0.5, 0.95]
    pool = BlockPool(topk=10, min_blocks=4, max_blocks=20, window=2)
    for _ in entropies:
        pool.add_layer()
    for _ in range(2):  # until every layer has a full window of samples the split is uniform, decoding or not
        pool.reset(1)
        assert [pool.take(layer, 0, e, 100, dynamic=True) for layer, e in enumerate(entropies)] == [10] * 4
    assert pool.ready()
    pool.reset(1)
    assert [pool.take(layer, 0, e, 100, dynamic=False) for layer, e in enumerate(entropies)] == [10] * 4  # prompt
    pool.reset(1)
    dynamic = [pool.take(layer, 0, e, 100, dynamic=True) for layer, e in enumerate(entropies)]
    assert dynamic == _expected_split(entropies, 10, 100, 4, 20) == [4, 14, 8, 14]  # layer 0 clamped up to 4
    assert pool.remaining[0] == 0  # the pool is spent exactly
    pool.reset(1)
    few = [pool.take(layer, 0, e, 6, dynamic=True) for layer, e in enumerate(entropies)]
    assert all(4 <= k <= 6 for k in few)  # clamps: [min(N, 4), min(N, 20)]
    equal = BlockPool(topk=46, min_blocks=32, max_blocks=92, window=3)
    for _ in range(30):
        equal.add_layer()
    for _ in range(4):
        equal.reset(2)
        counts = [equal.take(layer, w, 0.97, 500, dynamic=True) for layer in range(30) for w in range(2)]
    assert equal.ready() and counts == [46] * 60  # equal entropies: topk each
    qwen = BlockPool(topk=23, min_blocks=32, max_blocks=46, window=1)
    for _ in range(28):
        qwen.add_layer()
    qwen.reset(1)
    assert [qwen.take(layer, 0, 0.9, 500, dynamic=False) for layer in range(28)] == [32] * 28  # overdraws
    assert qwen.remaining[0] == 23 * 28 - 32 * 28


def test_dynamic_cutoff_in_a_model_follows_the_recorded_entropies():
    """Dot-product scores (peaked, so entropies differ between layers; cosine scores are nearly uniform and the
    split stays at topk): every decode step's counts are the spec's split of the recorded entropies."""
    model = tiny_model("llama")
    lo, hi = 1, 8
    method = kvsieve.method("actqkv", **dict(DYNAMIC, min_blocks=lo, max_blocks=hi), similarity="dot", warmup_calls=4)
    cache = SieveCache(model, method)
    greedy_with_logits(model, cache, random_ids(200, seed=4), 16, chunk_size=64)
    policies = [layer.policy for layer in cache.sieve_layers]
    pool = cache.shared["actqkv"].pool
    entropies = [p.entropies for p in policies]
    assert len({len(e) for e in entropies}) == 1
    window, topk, steps = method.entropy_window, method.blocks_per_step, 15  # 15 decode forwards
    n_blocks = policies[0].memory.n_blocks
    checked = 0
    for back in range(1, steps + 1):
        counts = pool.history[-back]
        j = len(entropies[0]) - back  # this step's entropy index
        assert all(min(n_blocks, lo) <= k <= min(n_blocks, hi) for k in counts)
        means = [sum(e[j - window + 1 : j + 1]) / window for e in entropies]
        expected = []
        remaining = topk * len(policies)
        for layer in range(len(policies)):
            later = [sum(e[j - window : j]) / window for e in entropies[layer + 1 :]]
            share = means[layer] / (means[layer] + sum(later)) * remaining
            k = max(min(round(share), min(n_blocks, hi)), min(n_blocks, lo))
            remaining -= k
            expected.append(k)
        assert counts == expected, (back, counts, expected)
        checked += 1
    assert checked == steps
    assert any(counts != [topk] * len(policies) for counts in pool.history[-steps:])  # the split really moved
    for p in policies:
        stats = p.stats()
        assert lo <= stats["retrieved_blocks_decode_min"] <= stats["retrieved_blocks_decode_max"] <= hi


# ------------------------------------------------------------------------------ question, state, config
def test_question_term_steers_prompt_retrieval_only():
    policy, _ = _policy(
        kvsieve.method(
            "actqkv",
            n_init=0,
            n_local=8,
            block_size=4,
            topk=1,
            exc_block_size=8,
            repr_topk=1,
            dynamic_topk=False,
        )
    )
    torch.manual_seed(0)
    policy.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0, Phase.PREFILL)
    reps = torch.randn(10, 64)
    for j in range(10):
        policy.memory.add(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), reps[j : j + 1], 8 + 4 * j)
    q_mem = torch.randn(1, 4, 8, 16)
    plain = policy.select_blocks(_call(Phase.PREFILL), q_mem, 0).item()
    target = (plain + 3) % 10
    policy.question = reps[target : target + 1].clone()  # the question matches block `target`
    assert policy.select_blocks(_call(Phase.PREFILL), q_mem, 0).item() == target
    assert policy.select_blocks(_call(Phase.DECODE), q_mem, 0).item() == plain  # generated tokens: no term


def test_question_vector_is_built_from_the_span():
    model = tiny_model("llama")
    ctx = random_ids(120)
    with_q = SieveCache(model, kvsieve.method("actqkv", **DYNAMIC))
    with_q.layout = PromptLayout(question=(3, 9))
    greedy_with_logits(model, with_q, ctx, 3, chunk_size=40)
    without = SieveCache(model, kvsieve.method("actqkv", **DYNAMIC, question_weight=0.0))
    without.layout = PromptLayout(question=(3, 9))
    greedy_with_logits(model, without, ctx, 3, chunk_size=40)
    heads_dim = model.config.num_attention_heads * 16
    for layer in with_q.sieve_layers:
        assert layer.policy.question.shape == (1, heads_dim)
    assert all(layer.policy.question is None for layer in without.sieve_layers)
    assert find_span([5, 1, 2, 3, 1, 2], [1, 2]) == (1, 3) and find_span([1], [2]) is None


def test_state_is_per_cache_not_per_process():
    """The same method twice on the same prompt gives the same result: statistics start fresh in every cache
    (the released code's module globals would make the second run start warm)."""
    model = tiny_model("llama")
    method = kvsieve.method("actqkv", **DYNAMIC, warmup_calls=3)
    ctx = random_ids(120)
    first, second = SieveCache(model, method), SieveCache(model, method)
    t1, l1 = greedy_with_logits(model, first, ctx, 5, chunk_size=40)
    t2, l2 = greedy_with_logits(model, second, ctx, 5, chunk_size=40)
    assert t1 == t2 and torch.equal(l1, l2)
    assert first.shared["actqkv"] is not second.shared["actqkv"]
    n_windows = first.sieve_layers[0].policy.activation.count // 3  # shared: every layer's windows count
    layered = SieveCache(model, kvsieve.method("actqkv", **DYNAMIC, stats_scope="layer"))
    greedy_with_logits(model, layered, ctx, 5, chunk_size=40)
    assert [layer.policy.activation.count for layer in layered.sieve_layers] == [n_windows] * 3


def test_presets_and_errors():
    llama = kvsieve.method("actqkv-llama3-2k")
    assert llama.budget_label == 2048 and llama.max_blocks_per_step == 92 and llama.cache_blocks == 128
    qwen = kvsieve.method("actqkv-qwen25-2k")
    assert (qwen.block_size, qwen.blocks_per_step, qwen.cache_blocks, qwen.budget_label) == (64, 23, 256, 2048)
    assert kvsieve.method("actqkv-2k").blocks_per_step == 46
    at_4k = kvsieve.method("actqkv-2k", budget=4096)  # derived: 128 + 1024 + 46 x 64, clamp [32, 92], cache 128
    assert (at_4k.block_size, at_4k.topk, at_4k.max_blocks_per_step, at_4k.cache_blocks) == (64, 46, 92, 128)
    with pytest.raises(ValueError, match=r"max_cached_block must be in \[92, inf\]"):
        kvsieve.method("actqkv", max_cached_block=64)
    with pytest.raises(ValueError, match="question must be"):  # the question's span is the cache's layout
        PromptLayout(question=(9, 3))
    with pytest.raises(ValueError, match="has no parameter 'question_span'"):  # one channel: no config field
        kvsieve.method("actqkv", question_span=(3, 9))
    with pytest.raises(ValueError, match="stats_scope must be one of"):
        kvsieve.method("actqkv", stats_scope="global")
    with pytest.raises(ValueError, match=r"topk must be in \[1, inf\]"):
        kvsieve.method("actqkv", topk=0)
    assert math.isclose(kvsieve.method("actqkv").question_weight, 4.0)


# ------------------------------------------------------------------------------------- default model
@pytest.mark.slow
def test_default_model_window_covers_the_prompt_equals_full(default_model):
    model, tok = default_model
    from kvsieve.prompts import encode_prompt

    ids, _ = encode_prompt(tok, passkey_prompt(tok, 1000, 0.3, "52719"))
    ref_tokens, ref_logits = greedy_with_logits(model, DynamicCache(config=model.config), ids, 8)
    method = kvsieve.method("actqkv", n_init=64, n_local=2048, block_size=32, topk=4, exc_block_size=256)
    tokens, logits = greedy_with_logits(model, SieveCache(model, method), ids, 8, chunk_size=512)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-3


@pytest.mark.slow
def test_default_model_passkey_beyond_its_window(default_model):
    """12K tokens at 2K attended entries, needle at half depth. Measured (docs/methods/infllm_actqkv.md): ActQKV
    answers at depth 0.5 but not at 0.2 or 0.8, where InfLLM does -- its cosine scores retrieve the needle's block
    in fewer layers on this model; with ``similarity="dot"`` it answers like InfLLM."""
    model, tok = default_model
    out = kvsieve.generate(
        model, tok, passkey_prompt(tok, 12_000, 0.5, "71432"), method="actqkv-2k", max_new_tokens=12, chunk_size=4096
    )
    assert out.stats.prompt_tokens > 11_500
    assert "71432" in out.text


# ------------------------------------------------------------------ fidelity to the released driver and code
def _spy_windows(cache):
    """Per layer, the (phase, window width) of every block lookup the layers make."""
    seen = {i: [] for i in range(len(cache.sieve_layers))}
    for i, layer in enumerate(cache.sieve_layers):
        policy, original = layer.policy, layer.policy.select_blocks

        def spy(call, q_mem, window, _original=original, _log=seen[i]):
            _log.append((call.phase, q_mem.shape[2]))
            return _original(call, q_mem, window)

        policy.select_blocks = spy
    return seen


@pytest.mark.parametrize("name", ["infllm", "actqkv"])
def test_the_last_prompt_token_gets_its_own_lookup_in_every_path(name):
    """The released drivers prefill ``input_ids[:-1]`` and feed the last prompt token alone: its lookup reads its
    own query. Chunked prefill, a question chunk fed after compression, and ``model.generate``."""
    model = tiny_model("llama")
    method = kvsieve.method(name, **(SMALL if name == "infllm" else DYNAMIC))
    ctx, question = random_ids(61), random_ids(5, seed=3)
    cache = SieveCache(model, method)
    seen = _spy_windows(cache)
    greedy_with_logits(model, cache, ctx, 3, chunk_size=20)  # chunks 20, 20, 20, 1 (the last: PREFILL_LAST)
    widths = [w for _, w in seen[0]]
    assert widths == [8, 8, 4] * 3 + [1, 1, 1], widths  # the 1-token last chunk, then two decode steps
    cache = SieveCache(model, method)
    seen = _spy_windows(cache)
    greedy_with_logits(model, cache, ctx[:60], 2, question=question, chunk_size=30)
    widths = [w for _, w in seen[0]]
    assert widths == [8, 8, 8, 6, 8, 8, 8, 5, 1, 4, 1, 1], widths  # chunks 30 + 30 (last split), question 5, 1 step
    cache = SieveCache(model, method)
    seen = _spy_windows(cache)
    model.generate(torch.tensor([ctx[:60]]), **cache_kwargs(model, cache), max_new_tokens=2, do_sample=False)
    assert [w for _, w in seen[0]] == [8] * 7 + [3, 1] + [1]


def test_the_last_tokens_own_query_finds_a_block_the_window_mean_misses():
    """A memory of random blocks plus two planted ones: the mean of the last window's queries points at block A,
    the last token's query at block B. Fed alone, the last token retrieves B; folded into the window it would not."""
    policy, _ = _policy(kvsieve.method("infllm", n_init=0, n_local=8, block_size=4, topk=1, exc_block_size=8))
    torch.manual_seed(0)
    policy.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0, Phase.PREFILL)
    window = torch.randn(1, 4, 9, 16) * 0.1
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    window[:, :, :8] += a[None, :, None]  # eight queries near A
    window[:, :, 8] += b[None] * 0.5  # the last one near B
    for j in range(10):
        rep = a.reshape(1, -1) if j == 2 else b.reshape(1, -1) if j == 6 else torch.randn(1, 64) * 0.1
        policy.memory.add(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), rep, 8 + 4 * j)
    call = _call(Phase.PREFILL_LAST)
    assert policy.select_blocks(call, window, 0).tolist() == [[2]]  # the whole window's mean: A
    assert policy.select_blocks(call, window[:, :, 8:], 1).tolist() == [[6]]  # the last token alone: B


def test_the_question_term_acts_from_the_first_retrieving_window():
    """Query-aware, the whole prompt in one chunk with the question at its end: the question vector is read ahead
    from the chunk and steers the first window that retrieves (it used to be built after the last window)."""
    model = tiny_model("llama")
    ctx = random_ids(96)
    span = (88, 96)
    runs = {}
    for weight in (0.0, 4.0):
        method = kvsieve.method("actqkv", **SMALL, dynamic_topk=False, question_weight=weight)
        cache = SieveCache(model, method, trace=True)
        cache.layout = PromptLayout(question=span)
        greedy_with_logits(model, cache, ctx, 1)
        runs[weight] = cache
    for layer in runs[4.0].sieve_layers:
        assert layer.policy.question is not None
    policy = runs[4.0].sieve_layers[0].policy
    # windows of 8 queries: blocks exceed topk=3 from the window ending at 48 (n_init 4 + window 16 + 4 blocks x 4)
    first_retrieving = 5
    assert policy.blocks_prefill[first_retrieving] == 3 and policy.memory is not None
    differs = [
        not torch.equal(a.meter.trace[first_retrieving], b.meter.trace[first_retrieving])
        for a, b in zip(runs[0.0].sieve_layers, runs[4.0].sieve_layers)
    ]
    assert any(differs), "the question term changed no layer's first retrieval"
    early = [
        not torch.equal(a.meter.trace[w], b.meter.trace[w])
        for a, b in zip(runs[0.0].sieve_layers, runs[4.0].sieve_layers)
        for w in range(first_retrieving)
    ]
    assert not any(early)  # before retrieval starts, nothing to steer


def test_activation_weights_act_after_the_default_warmup_on_a_2k_prompt():
    """Default warm-up: only the window that starts the statistics (layer 0's first) reads the plain mean; every
    later window is weighted. With the released 1000 calls a 2K prompt of 3 layers never leaves the warm-up."""
    model = tiny_model("llama")
    method = kvsieve.method("actqkv", n_init=64, n_local=512, block_size=32, topk=8, exc_block_size=256)
    cache = SieveCache(model, method)
    greedy_with_logits(model, cache, random_ids(2048, seed=5), 2)
    policies = [layer.policy for layer in cache.sieve_layers]
    stats = cache.shared["actqkv"].activation
    calls = 8 + 1 + 1  # 2047 tokens in windows of 256, the last prompt token alone, one decode step
    assert stats.count == len(policies) * calls
    assert [p.weighted_windows for p in policies] == [calls - 1] + [calls] * (len(policies) - 1)
    weights = stats.bias_weights(torch.randn(1, 256, stats.mean.shape[-1]))
    assert weights.std() > 0.1 / 256  # not uniform
    released = SieveCache(model, kvsieve.method("actqkv", **{**method.params(), "warmup_calls": 1000}))
    greedy_with_logits(model, released, random_ids(2048, seed=5), 2)
    assert all(layer.policy.weighted_windows == 0 for layer in released.sieve_layers)


def test_generate_question_reaches_actqkv():
    """``kvsieve.generate(..., question=...)``: the question chunk is ActQKV's question span (query-agnostic: the
    context is read without it; the question chunk's last token and its lookup use the term)."""
    from helpers import IdTokenizer

    model, tok = tiny_model("llama"), IdTokenizer()
    ctx, question = random_ids(80), random_ids(6, seed=9)
    method = kvsieve.method("actqkv", **DYNAMIC)
    out = kvsieve.generate(model, tok, ctx, method=method, question=question, max_new_tokens=3)
    assert all(layer["question_vector"] for layer in out.stats.layers)
    off = kvsieve.generate(
        model,
        tok,
        ctx,
        method=kvsieve.method("actqkv", **DYNAMIC, question_weight=0.0),
        question=question,
        max_new_tokens=3,
    )
    assert not any(layer["question_vector"] for layer in off.stats.layers)
