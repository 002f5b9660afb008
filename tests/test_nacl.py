"""NACL (arXiv 2408.03675): exactness, the kept set's composition, the proxy score, the random draw, seeds.

* Budget at least the prompt: identical tokens to plain ``model.generate`` (tiny models and the default model).
* Kept counts per head are exactly sink + recent + C_p + C_r; sink and recent always kept; heads differ.
* With C_r = 0 the kept set is sink ∪ recent ∪ top-C_p of a proxy score computed here directly (float64, eager).
* The random part follows softmax(F): inclusion frequencies over many seeds match the exact without-replacement
  probabilities, enumerated.
* Logits equal the full cache with exactly the evicted keys masked (query-aware, chunked, question as proxies,
  question after compression).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import TINY_CONFIGS, IdTokenizer, masked_reference, random_ids, spy_observed_calls, tiny_model, traces_of
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods.base import resolve_budget
from kvsieve.methods.nacl import layer_generator, select_kept

N_PROMPT, N_NEW = 48, 8
LOGIT_TOL = 1e-4  # fp32, sdpa over the kept entries vs masked sdpa over all of them; measured ~1e-6
CPU = torch.device("cpu")


@torch.inference_mode()
def run(model, method, context, n_new=N_NEW, question=None, chunk_size=None):
    """kvsieve's own prefill (question as proxies when the method wants it), then greedy decoding with logits."""
    cache = SieveCache(model, method, trace=True)
    logits = Driver(model, cache).prompt(context, question or [], chunk_size=chunk_size).float()
    tokens, all_logits = [], []
    for step in range(n_new):
        all_logits.append(logits[0])
        tokens.append(int(logits.argmax(-1)))
        if step + 1 < n_new:
            out = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_kwargs(model, cache))
            logits = out.logits[:, -1].float()
    return cache, tokens, torch.stack(all_logits)


def kept_after_prefill(model, method, context, question=None, chunk_size=None) -> list[torch.Tensor]:
    """Logical positions ``[H_kv, k]`` each layer keeps right after compression (batch row 0)."""
    cache = SieveCache(model, method)
    with torch.inference_mode():
        Driver(model, cache).prompt(context, question or [], chunk_size=chunk_size)
    return [layer.policy.store.positions[0].long().sort(dim=-1).values for layer in cache.sieve_layers]


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_budget_at_least_prompt_equals_model_generate(arch):
    model = tiny_model(arch)
    ids = torch.tensor([random_ids(N_PROMPT)])
    kw = dict(max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    for params in (dict(budget=1.0), dict(budget=N_PROMPT), dict(budget=8, min_eviction_seqlen=N_PROMPT)):
        cache = SieveCache(model, kvsieve.method("nacl", **params))
        ours = model.generate(ids, **cache_kwargs(model, cache), **kw)
        assert torch.equal(ours, reference), f"{arch} {params}"
        assert all(layer.policy.stats()["evicted"] is False for layer in cache.sieve_layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["one_prompt", "chunked", "question", "question_after"])
def test_logits_equal_masked_reference(arch, mode):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    question = random_ids(6, seed=7) if mode.startswith("question") else None
    chunk = 16 if mode == "chunked" else None
    source = "last" if mode == "question_after" else "question"
    method = kvsieve.method("nacl", budget=24, proxy_ratio=0.125, proxy_source=source, n_sink=2)
    cache, tokens, logits = run(model, method, ctx, question=question, chunk_size=chunk)
    stats = cache.sieve_layers[0].policy.stats()
    assert stats["evicted"] and stats["kept_random"][0] > 0 and stats["kept_proxy_top"][0] > 0
    assert stats["proxy_source"] == ("question" if mode == "question" else "last")
    n = N_PROMPT + (6 if mode == "question" else 0)  # the question is part of the compressed prompt
    assert stats["prompt_tokens"] == n and all(layer.meter.stored_after_prefill == 24 for layer in cache.sieve_layers)
    reference = masked_reference(model, traces_of(cache), ctx, tokens, question=question, chunk_size=chunk)
    diff = (logits - reference).abs().max().item()
    assert diff < LOGIT_TOL, f"{arch}/{mode}: max |dlogit| = {diff:.2e}"


# ------------------------------------------------------------------------------------------ the kept set
def test_kept_counts_parts_and_protected_positions():
    model = tiny_model("llama")
    n, k = 64, 32
    method = kvsieve.method("nacl", budget=k, n_sink=4, protect=12, proxy_keep=10, proxy_ratio=0.25, keep_proxies=False)
    cache = SieveCache(model, method)
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(n))
    for layer in cache.sieve_layers:
        positions = layer.policy.store.positions[0].long()  # [H_kv, k]
        assert positions.shape == (2, k)
        for head in positions:
            assert len(set(head.tolist())) == k  # no duplicates
            assert set(range(4)) <= set(head.tolist())  # sink
            assert set(range(n - 8, n)) <= set(head.tolist())  # recent = protect - sink
        stats = layer.policy.stats()
        assert stats["kept_per_head"] == [k, k]
        assert (stats["kept_sink"], stats["kept_recent"]) == ([4, 4], [8, 8])
        assert (stats["kept_proxy_top"], stats["kept_random"]) == ([10, 10], [10, 10])  # C_r: the rest
        assert not torch.equal(positions[0], positions[1])  # heads select independently
        assert layer.policy.kv_bytes() == 2 * k * 2 * 16 * 4  # K and V, 2 heads, head_dim 16, fp32: really freed


def test_a_rows_random_part_does_not_depend_on_its_place_in_the_batch():
    """Each batch row draws what the prompt alone draws (its own generator per layer): two identical rows keep the
    same set, score-driven and random parts alike, and it is the set of the prompt run alone."""
    model = tiny_model("llama")
    prompt = random_ids(N_PROMPT)
    for budget, random_keep in ((14, 0), (24, None)):
        method = kvsieve.method(
            "nacl", budget=budget, protect=4, proxy_keep=10, random_keep=random_keep, proxy_ratio=0.1
        )
        kept = []
        for rows in (2, 1):
            cache = SieveCache(model, method)
            with torch.inference_mode():
                model(input_ids=torch.tensor([prompt] * rows), **cache_kwargs(model, cache))
            kept.append(
                [[r.policy.store.positions[0].sort(-1).values for r in layer.rows] for layer in cache.sieve_layers]
            )
        for both, (alone,) in zip(*kept):
            assert all(p.shape[-1] == budget for p in both)
            assert torch.equal(both[0], alone) and torch.equal(both[1], alone)


def test_generation_stats_report_the_parts():
    model = tiny_model("qwen2")
    out = kvsieve.generate(model, IdTokenizer(), random_ids(N_PROMPT), method=kvsieve.method("nacl", budget=0.5),
                           max_new_tokens=3)  # fmt: skip
    assert out.stats.kv_stored_tokens_per_layer == [24] * 3
    for entry in out.stats.layers:
        parts = [entry[f"kept_{p}"][0] for p in ("sink", "recent", "proxy_top", "random")]
        assert sum(parts) == entry["kept_per_head"][0] == entry["budget_tokens"] == 24
        assert entry["kept_random"][0] > 0


def _direct_scores(query, keys, scaling, start, gqa):
    """sum_p softmax(q_p K^T * scaling) over the proxies p >= start, causal, float64, the whole matrix at once."""
    q = query[0, :, start:].double()  # [H, p, D]
    h, p, _ = q.shape
    n_kv = keys.shape[1]
    g = h // n_kv
    k = keys[0].double().repeat_interleave(g, dim=0)  # [H, n, D]
    logits = q @ k.transpose(-1, -2) * scaling  # [H, p, n]
    n = k.shape[1]
    visible = torch.arange(n)[None, :] <= torch.arange(start, start + p)[:, None]
    probs = logits.masked_fill(~visible, -math.inf).softmax(dim=-1).sum(dim=1)  # [H, n]
    return probs.view(n_kv, g, n).sum(dim=1) if gqa == "sum" else probs[:n_kv]


@pytest.mark.parametrize("gqa", ["sum", "code"])
def test_topk_only_is_sink_recent_and_top_proxy_scores(gqa):
    model = tiny_model("llama")
    n, sink, protect, c_p, ratio = 64, 2, 10, 14, 0.25
    method = kvsieve.method("nacl", budget=protect + c_p, n_sink=sink, protect=protect, proxy_keep=c_p,
                            random_keep=0, proxy_ratio=ratio, keep_proxies=False, gqa=gqa, score_block=5)  # fmt: skip
    cache = SieveCache(model, method)
    seen = spy_observed_calls(cache)
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(n))
    start = n - int(ratio * n)
    kept_sets = []
    for i, layer in enumerate(cache.sieve_layers):
        query, keys, scaling = seen[i]
        scores = _direct_scores(query, keys, scaling, start, gqa)  # [H_kv, n]
        candidates = scores[:, sink : n - (protect - sink)]
        ranked = candidates.sort(dim=-1, descending=True).values
        assert (ranked[:, c_p - 1] - ranked[:, c_p]).min() > 1e-5  # no near-tie: the top-C_p set is well defined
        for head in range(2):
            top = (candidates[head].topk(c_p).indices + sink).tolist()
            expected = sorted(set(range(sink)) | set(range(n - protect + sink, n)) | set(top))
            assert layer.policy.store.positions[0, head].long().sort().values.tolist() == expected
        kept_sets.append(layer.policy.store.positions.clone())
        if not torch.allclose(scores[0], scores[1]):  # scores differ between heads, so do the kept sets
            assert not torch.equal(kept_sets[-1][0, 0], kept_sets[-1][0, 1])
    if gqa == "code":  # the released code's indexing really selects differently from the group sum
        other = kept_after_prefill(model, kvsieve.method("nacl", **{**method.params(), "gqa": "sum"}), random_ids(n))
        assert any(not torch.equal(a[0].long().sort(dim=-1).values, b) for a, b in zip(kept_sets, other))


def _inclusion_exact(logits: list[float], draws: int) -> list[float]:
    """P(item i is among ``draws`` sequential draws without replacement, each from softmax over what is left)."""
    weights = [math.exp(x) for x in logits]
    inclusion = [0.0] * len(weights)
    for order in itertools.permutations(range(len(weights)), draws):
        prob, left = 1.0, sum(weights)
        for i in order:
            prob *= weights[i] / left
            left -= weights[i]
        for i in order:
            inclusion[i] += prob
    return inclusion


def test_random_part_follows_softmax_of_the_scores():
    # positions 0..7: sink 0, recent 7, candidates 1..6; the top-1 candidate (5) goes to C_p, two of the other five
    # are drawn. Exact inclusion probabilities by enumerating the 20 ordered draws.
    scores = torch.tensor([9.0, 0.3, 2.5, 0.0, 1.0, 3.0, 1.5, 9.0])
    rest = [1, 2, 3, 4, 6]
    exact = dict(zip(rest, _inclusion_exact([float(scores[i]) for i in rest], 2)))
    assert max(abs(p - 2 / 5) for p in exact.values()) > 0.25  # far from uniform: the test can tell them apart
    heads, seeds = 4, 5000
    counts = torch.zeros(8)
    batch = scores.expand(1, heads, 8).contiguous()
    for seed in range(seeds):
        sel = select_kept(batch, 1, 1, 1, 2, layer_generator(seed, 0))
        assert (sel.top == 5).all()
        counts.scatter_add_(0, sel.random.flatten(), torch.ones(heads * 2))
        assert sel.kept.shape == (1, heads, 5)
    freq = counts / (heads * seeds)
    # 20,000 independent draws: the standard error of a frequency is <= 0.0035; 0.015 is > 4 standard errors.
    assert freq[[0, 5, 7]].sum() == 0  # protected and top-C_p entries are never drawn
    for i in rest:
        assert abs(freq[i].item() - exact[i]) < 0.015, (i, freq[i].item(), exact[i])


def test_sampling_survives_underflowing_softmax():
    """Scores 1000 apart: softmax(F) underflows to zeros in float64 (numpy's choice would refuse); the draw still
    returns C_r distinct candidates, the highest-scored first."""
    scores = torch.tensor([[[0.0, 1000.0, 500.0, 0.0, 1.0, 2.0]]])
    sel = select_kept(scores, 0, 0, 0, 3, layer_generator(0, 0))
    assert sorted(sel.random[0, 0].tolist())[:2] == [1, 2] and len(set(sel.kept[0, 0].tolist())) == 3


def test_same_seed_same_kept_set_other_seed_differs():
    model = tiny_model("llama")
    ctx = random_ids(N_PROMPT)

    def kept(seed):
        return kept_after_prefill(model, kvsieve.method("nacl", budget=20, proxy_ratio=0.1, seed=seed), ctx)

    first, again, other = kept(0), kept(0), kept(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_chunked_prefill_keeps_the_same_set_and_bounds_the_query_buffer():
    model = tiny_model("llama")
    n, ratio = 96, 0.25  # 24 proxies spanning three chunks of 8
    ctx = random_ids(n)
    method = kvsieve.method("nacl", budget=40, proxy_ratio=ratio)
    whole = kept_after_prefill(model, method, ctx)
    cache = SieveCache(model, method)
    held = []
    policy = cache.sieve_layers[0].policy
    original = policy.observe

    def spy(call):
        original(call)
        held.append((call.seen, policy.queries.shape[2]))

    policy.observe = spy
    with torch.inference_mode():
        Driver(model, cache).prompt(ctx, chunk_size=8)
    chunked = [layer.policy.store.positions[0].long().sort(dim=-1).values for layer in cache.sieve_layers]
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert len(held) == n // 8
    assert all(m <= ratio * seen + 8 + 1 for seen, m in held)  # never more than the possible proxies + a chunk


# ------------------------------------------------------------------------------------------ configuration
def test_presets_reproduce_their_tables():
    code = kvsieve.method("nacl-code")
    n = 128_000  # the released code's ratios add up to its 20% here: int() of each, 256 sink tokens
    assert code.split(n) == (256, int(0.01 * n) - 256, int(0.12 * n), int(0.07 * n))
    assert code.split(4096) == (20, 21, 491, 287)  # short prompt: the sink takes half of the protected part
    assert code.min_eviction_seqlen == 0 and code.proxy_source == "last" and code.name == "nacl-code"
    for pct, parts in {10: (1, 2, 7), 20: (2, 6, 12), 30: (1.5, 10.5, 18)}.items():
        m = kvsieve.method(f"nacl-paper-{pct}")
        sink, recent, c_p, c_r = m.split(100_000)
        assert (sink, recent, c_p, c_r) == tuple(round(p * 1000) for p in (0, *parts))
    default = kvsieve.method("nacl", budget=400)
    assert default.split(2000) == (4, 16, 240, 140)  # 5 : 60 : 35 of the budget
    assert default.split(2000, n_proxy=30) == (4, 30, 240, 126)  # keep_proxies: the recent window covers them


# The presets' tables as fractions of the prompt (the released code floors each): (budget, n_sink, protect, C_p, C_r)
PRESET_TABLES = {
    "nacl-code": (0.2, 256, 0.01, 0.12, 0.07),
    "nacl-paper-10": (0.1, 0, 0.01, 0.02, 0.07),
    "nacl-paper-20": (0.2, 0, 0.02, 0.06, 0.12),
    "nacl-paper-30": (0.3, 0, 0.015, 0.105, 0.18),
}


@pytest.mark.parametrize("name", PRESET_TABLES)
def test_preset_shares_keep_the_table_wherever_the_table_adds_up(name):
    """At its own budget a preset keeps its table's floored prompt fractions on every prompt length where those add
    up to the budget (before the parts became shares of the budget, that was all it ever kept)."""
    budget, n_sink, *fractions = PRESET_TABLES[name]
    method = kvsieve.method(name)
    compared = 0
    for n in range(1, 60_001):
        protect, c_p, c_r = (int(f * n) for f in fractions)
        if protect + c_p + c_r != min(resolve_budget(budget, n), n):
            continue
        sink = min(n_sink, protect // 2)
        assert method.split(n) == (sink, protect - sink, c_p, c_r), n
        compared += 1
    assert compared > 1000


def stored_per_layer(model, method, n: int) -> list[int]:
    """Entries per KV head each layer stores right after the prompt, measured from its store and its meter."""
    cache = SieveCache(model, method)
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(n))
    stored = [layer.policy.store.length for layer in cache.sieve_layers]
    assert stored == [layer.meter.stored_after_prefill for layer in cache.sieve_layers]
    assert all(layer.policy.store.keys.shape[2] == s for layer, s in zip(cache.sieve_layers, stored))
    return stored


def test_paper_preset_at_budget_64_stores_64():
    """Before: the preset's parts were fractions of the prompt, so budget=64 on 600 tokens kept 6 + 12 + 42."""
    assert stored_per_layer(tiny_model("llama"), kvsieve.method("nacl-paper-10", budget=64), 600) == [64] * 3


NACL_METHODS = [info.name for info in kvsieve.methods() if info.name == "nacl" or info.preset_of == "nacl"]


@pytest.mark.parametrize("name", NACL_METHODS)
def test_every_nacl_method_stores_exactly_its_budget(name):
    model = tiny_model("llama")
    for budget, n in itertools.product((16, 64, 0.1, 0.3), (50, 300, 3000)):
        expected = min(resolve_budget(budget, n), n)
        assert stored_per_layer(model, kvsieve.method(name, budget=budget), n) == [expected] * 3, (budget, n)


def test_token_parts_are_honoured_and_the_rest_is_shared():
    model = tiny_model("llama")
    method = kvsieve.method("nacl-paper-20", budget=0.3, protect=6, proxy_keep=20)  # C_r: the rest, 90 - 26
    cache = SieveCache(model, method)
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(300))
    for layer in cache.sieve_layers:
        stats = layer.policy.stats()
        assert stats["kept_per_head"] == [90, 90]
        assert (stats["kept_recent"], stats["kept_proxy_top"], stats["kept_random"]) == ([6] * 2, [20] * 2, [64] * 2)


def test_preset_budget_override_scales_the_parts():
    assert kvsieve.method("nacl-paper-20", budget=0.3).split(1000) == (0, 30, 90, 180)  # 1 : 3 : 6 of 300
    assert kvsieve.method("nacl-paper-20", budget=64).split(1000) == (0, 6, 19, 39)
    assert kvsieve.method("nacl-paper-20", budget=64, proxy_keep=40).split(1000) == (0, 3, 40, 21)  # 1 : 6 of 24


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (dict(protect=0.01), TypeError, r"protect must be None or an int \(tokens\), got 0.01; .* shares="),
        (dict(proxy_keep=-1), ValueError, r"proxy_keep must be in \[0, inf\]"),
        (dict(random_keep="7%"), TypeError, "random_keep must be None or an int"),
        (dict(shares=(0.1, 0.9)), ValueError, "shares must be three numbers >= 0 with a positive sum"),
        (dict(shares=(0, 0, 0)), ValueError, "shares must be three numbers"),
        (dict(shares=(-0.1, 0.6, 0.5)), ValueError, "shares must be three numbers"),
        (dict(proxy_ratio=0.0), ValueError, r"proxy_ratio must be in \(0.0, 1.0\]"),
        (dict(proxy_ratio=1.2), ValueError, r"proxy_ratio must be in \(0.0, 1.0\]"),
        (dict(budget=30, protect=10, proxy_keep=25), ValueError, r"protect \(10\) \+ proxy_keep \(25\) = 35 tokens "
         "exceed budget = 30 tokens$"),
        (dict(budget=30, proxy_keep=20, random_keep=20), ValueError, r"random_keep \(20\) = 40 tokens exceed"),
        (dict(budget=30, protect=2, proxy_keep=10, random_keep=5), ValueError, "= 17 tokens must equal budget = 30"),
        (dict(gqa="mean"), ValueError, "gqa must be one of 'sum', 'code'"),
        (dict(proxy_source="all"), ValueError, "proxy_source must be one of"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, inf\]"),
        (dict(n_sink=-4), ValueError, r"n_sink must be in \[0, inf\]"),
        (dict(min_eviction_seqlen=-1), ValueError, r"min_eviction_seqlen must be in \[0, inf\]"),
        (dict(keep_proxies=1), TypeError, "keep_proxies must be a bool"),
    ],
)  # fmt: skip
def test_bad_parameters_name_themselves(params, error, match):
    with pytest.raises(error, match=match):
        kvsieve.method("nacl", **params)


def test_inconsistent_parts_fail_at_compression_with_the_numbers():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"proxy_keep \(30\) = 30 tokens exceed budget = 24 tokens for a 48-token"):
        kept_after_prefill(model, kvsieve.method("nacl", budget=0.5, proxy_keep=30), random_ids(N_PROMPT))
    all_three = dict(protect=4, proxy_keep=10, random_keep=5)
    with pytest.raises(ValueError, match="= 19 tokens must equal budget = 24 tokens for a 48-token prompt"):
        kept_after_prefill(model, kvsieve.method("nacl", budget=0.5, **all_three), random_ids(N_PROMPT))


def test_more_proxies_than_the_budget_keeps_the_latest_proxies():
    """keep_proxies with 24 proxies and a budget of 20: the recent window takes the whole budget (it used to fail)."""
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("nacl", budget=20, proxy_ratio=0.5))
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(N_PROMPT))
    for layer in cache.sieve_layers:
        assert layer.policy.store.positions[0].long().sort(dim=-1).values.tolist() == [list(range(28, 48))] * 2
        assert layer.policy.stats()["kept_recent"] == [20, 20]


def test_nacl_code_compresses_short_prompts_unless_the_released_guard_is_asked_for():
    model = tiny_model("llama")
    assert stored_per_layer(model, kvsieve.method("nacl-code"), 1000) == [200] * 3
    guarded = kvsieve.method("nacl-code", min_eviction_seqlen=2048)  # the released code's guard, by request
    assert stored_per_layer(model, guarded, 1000) == [1000] * 3
    assert stored_per_layer(model, guarded, 2100) == [420] * 3


# ------------------------------------------------------------------------------------------ default model
def long_text(n_lines: int = 60) -> str:
    lines = [
        f"Entry {i}: the archivist moved box {i * 7 % 53} to shelf {i % 11}, then wrote a note about the weather."
        for i in range(n_lines)
    ]
    return "Read the log below.\n\n" + "\n".join(lines)


@pytest.mark.slow
def test_default_model_budget_at_least_prompt_equals_model_generate(default_model):
    model, tok = default_model
    ids = torch.tensor([tok(long_text(38))["input_ids"]])
    assert 900 <= ids.shape[1] <= 1400
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    cache = SieveCache(model, kvsieve.method("nacl", budget=1.0))
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), reference)


@pytest.mark.slow
def test_default_model_question_as_proxies_equals_masked_reference(default_model):
    model, tok = default_model
    ctx = tok(long_text(10))["input_ids"]
    question = tok("\nWhich shelf got box 14?", add_special_tokens=False)["input_ids"]
    cache, tokens, logits = run(model, kvsieve.method("nacl", budget=0.2), ctx, n_new=5, question=question)
    stats = cache.sieve_layers[0].policy.stats()
    assert stats["proxy_source"] == "question" and stats["proxy_tokens"] == len(question)
    assert stats["kept_recent"][0] == len(question) and stats["kept_random"][0] > 0  # the question is kept
    reference = masked_reference(model, traces_of(cache), ctx, tokens, question=question)
    assert (logits - reference).abs().max().item() < 1e-3  # fp32, 30 layers; measured ~1e-5


def test_nacl_last_is_query_agnostic_with_a_separate_question():
    """``nacl-last``: the context is compressed before the question arrives (proxies: the context's last 1%), so
    the question is never a proxy and never evicted; ``nacl`` waits for the question and takes it as proxies."""
    model, tok = tiny_model("llama"), IdTokenizer()
    ctx, question = random_ids(200), random_ids(6, seed=4)
    out = kvsieve.generate(model, tok, ctx, method=kvsieve.method("nacl-last", budget=40), question=question)
    assert out.stats.kv_stored_tokens == 40  # compressed at the context's end: 20% of 200
    last = out.stats.layers[0]
    assert last["proxy_source"] == "last" and last["prompt_tokens"] == len(ctx) and last["proxy_tokens"] == 2
    aware = kvsieve.generate(model, tok, ctx, method=kvsieve.method("nacl", budget=40), question=question)
    assert aware.stats.layers[0]["proxy_source"] == "question"
    assert aware.stats.layers[0]["prompt_tokens"] == len(ctx) + len(question)
