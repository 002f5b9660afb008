"""RefreshKV (arXiv 2411.05787): the equivalences the paper's algorithm implies, on tiny models and the default one.

* Every step full (fixed schedule with stride 1, or query similarity with stride 1 and a threshold above 1), or a
  partial cache at least as large as the context: exactly the full cache (tokens and logits).
* Refresh disabled: SnapKV with an observation window of one token (kernel 7, max over the GQA group) applied
  after the prompt, then the rolling replacement -- checked against an independent reimplementation (eager
  attention weights of the last prompt token, a plain-Python rolling list) replayed on the full cache with masks.
* The default (query-similarity) schedule: logits equal the full cache with exactly the entries each call attended,
  full or partial (the trace), through one-shot and chunked prefill and a question chunk.
* A partial step attends exactly K entries per KV head plus the new token; C_f holds every token.
* Each layer keeps its own schedule (constructed drift in some layers only); the similarity is pre-RoPE.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import TINY_CONFIGS, IdTokenizer, greedy_with_logits, masked_reference, random_ids, tiny_model, traces_of
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import Phase
from kvsieve.ops.rope import Rotary

N_PROMPT, N_NEW = 48, 10
BIG = N_PROMPT + N_NEW + 8  # a partial cache that holds every token: nothing is ever evicted
LOGIT_TOL = 1e-4  # compressed vs masked full cache on tiny fp32 models (same math, different kernels)


def refreshkv(**params) -> kvsieve.methods.Method:
    return kvsieve.method("refreshkv", **params)


def _layers(cache: SieveCache):
    return cache.sieve_layers


# ------------------------------------------------------------------------------------ equal to the full cache
EVERY_STEP_FULL = {
    "fixed_stride_1": dict(schedule="fixed", stride=1, budget=8),
    "similarity_stride_1_threshold_above_1": dict(stride=1, threshold=1.5, budget=8),
    "budget_covers_context": dict(budget=BIG, stride=3),
}


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_every_step_full_or_budget_covering_context_equals_full(arch):
    model = tiny_model(arch)
    ids = torch.tensor([random_ids(N_PROMPT)])
    kw = dict(max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    ctx = random_ids(N_PROMPT)
    _, ref_logits = greedy_with_logits(model, DynamicCache(config=model.config), ctx, N_NEW, chunk_size=20)
    for label, params in EVERY_STEP_FULL.items():
        cache = SieveCache(model, refreshkv(**params))
        ours = model.generate(ids, **cache_kwargs(model, cache), **kw)
        assert torch.equal(ours, reference), f"{arch}/{label}: model.generate differs from the full cache"
        # kvsieve's own loop, chunked prefill: bit-identical logits
        _, logits = greedy_with_logits(model, SieveCache(model, refreshkv(**params)), ctx, N_NEW, chunk_size=20)
        assert torch.equal(logits, ref_logits), f"{arch}/{label}: logits differ from the full cache"
        if params["budget"] == 8:  # really every step full (and the partial cache really smaller)
            stats = [layer.policy.stats() for layer in _layers(cache)]
            assert all(s["full_steps"] == N_NEW - 1 and s["partial_steps"] == 0 for s in stats)
            assert all(s["partial_cache_tokens"] == 8 for s in stats)


def test_sampling_through_both_loops_with_a_covering_budget_equals_full():
    model = tiny_model("qwen2")
    ctx = random_ids(N_PROMPT)
    kw = dict(max_new_tokens=N_NEW, temperature=0.9, top_p=0.95, seed=3, stop_at_eos=False)
    full = kvsieve.generate(model, IdTokenizer(), ctx, method="full", **kw)
    ours = kvsieve.generate(model, IdTokenizer(), ctx, method=refreshkv(budget=BIG, stride=2), **kw)
    assert ours.tokens == full.tokens
    ids = torch.tensor([ctx])
    gen_kw = dict(max_new_tokens=N_NEW, do_sample=True, attention_mask=torch.ones_like(ids), pad_token_id=0)
    torch.manual_seed(5)
    reference = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **gen_kw)
    torch.manual_seed(5)
    no_refresh = SieveCache(model, refreshkv(budget=BIG, refresh=False))
    sampled = model.generate(ids, **cache_kwargs(model, no_refresh), **gen_kw)
    assert torch.equal(sampled, reference)
    # compressed, sampling, both loops: runs to the end with the partial cache at K
    cache = SieveCache(model, refreshkv(budget=12, stride=2))
    out = model.generate(ids, **cache_kwargs(model, cache), **gen_kw)
    assert out.shape[1] == N_PROMPT + N_NEW
    assert all(layer.policy.partial.length == 12 for layer in _layers(cache))
    out = kvsieve.generate(model, IdTokenizer(), ctx, method=refreshkv(budget=12, stride=2), **kw)
    assert len(out.tokens) == N_NEW


# ------------------------------------------------------------------- refresh disabled = SnapKV(window 1) + rolling
def _independent_top_k(model, context: list[int], k: int, kernel: int = 7) -> list[list[dict[int, float]]]:
    """Per layer, per KV head: the top-``k`` prompt positions and their scores, computed without kvsieve from
    transformers' eager attention weights of the last token (max-pooling by slicing, max over the GQA group,
    ranked by score, ties to the older position)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=torch.tensor([context]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    n, half = len(context), kernel // 2
    n_kv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // n_kv
    selected = []
    for weights in attentions:
        row = weights[0, :, -1, :].double()  # [H, n]: the last token over every token
        pooled = torch.stack([row[:, max(0, j - half) : j + half + 1].amax(dim=1) for j in range(n)], dim=1)
        heads = []
        for kv in range(n_kv):
            score = pooled[kv * group : (kv + 1) * group].amax(dim=0).tolist()
            heads.append({j: score[j] for j in sorted(range(n), key=lambda j, s=score: (-s[j], j))[:k]})
        selected.append(heads)
    return selected


def _independent_kept_sets(model, context: list[int], k: int, n_calls: int) -> dict[int, list]:
    """Per layer, per attention call (the prefill, then ``n_calls`` single-token decode calls), per KV head: the
    positions attended with refresh disabled. A plain dict: each new token enters above every score (older
    generated tokens rank lower) and the worst entry leaves (ties: the newer)."""
    n = len(context)
    sets = {}
    for layer, heads in enumerate(_independent_top_k(model, context, k)):
        per_head = []
        for chosen in heads:
            entries = {j: (score, -j) for j, score in chosen.items()}
            calls = []
            for c in range(n_calls):
                entries[n + c] = (float("inf"), n + c)
                calls.append(set(entries))
                del entries[min(entries, key=entries.get)]
            per_head.append(calls)
        prefill = [set(range(n)) for _ in heads]
        sets[layer] = [prefill] + [[calls[c] for calls in per_head] for c in range(n_calls)]
    return sets


def _as_traces(sets: dict[int, list]) -> dict[int, list[torch.Tensor]]:
    return {
        layer: [torch.tensor([[sorted(head) for head in call]], dtype=torch.int32) for call in calls]
        for layer, calls in sets.items()
    }


@pytest.mark.parametrize(("arch", "k"), [("llama", 12), ("qwen2", 4), ("qwen3", 20)])
def test_refresh_disabled_equals_snapkv_window_one_then_rolling(arch, k):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    cache = SieveCache(model, refreshkv(budget=k, refresh=False), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW)
    expected = _independent_kept_sets(model, ctx, k, N_NEW - 1)
    for layer, calls in traces_of(cache).items():
        assert len(calls) == N_NEW
        for c, positions in enumerate(calls):
            got = [set(head.tolist()) for head in positions[0]]
            assert got == expected[layer][c], f"layer {layer}, call {c}: kept set differs from SnapKV(w=1)+rolling"
    # the independent sets, replayed on the full cache with everything else masked, give the same logits
    reference = masked_reference(model, _as_traces(expected), ctx, tokens)
    assert (logits - reference).abs().max().item() < LOGIT_TOL


# ------------------------------------------------------------------------- default schedule: masked reference
@pytest.mark.parametrize(
    ("arch", "mode", "params"),
    [
        ("llama", "one_chunk", {}),
        ("llama", "chunked", {}),
        ("llama", "question", {}),
        ("qwen2", "one_chunk", {"threshold": 0.3}),  # some checks stay partial in the random model
        ("qwen2", "question", {"threshold": 0.3}),
        ("qwen2", "question", {"refresh": False}),  # the question chunk attends C_p + itself
        ("gemma3_text", "chunked", {}),
    ],
)
def test_query_similarity_equals_masked_reference(arch, mode, params):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    question = random_ids(6, seed=7) if mode == "question" else None
    chunk = 16 if mode == "chunked" else None
    cache = SieveCache(model, refreshkv(budget=10, stride=2, **params), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW, question=question, chunk_size=chunk)
    stats = [layer.policy.stats() for layer in _layers(cache)]
    assert all(s["partial_steps"] > 0 for s in stats)
    if "threshold" in params:  # both outcomes of a check occur
        assert sum(s["full_steps"] for s in stats) > 0
        assert sum(s["query_checks"] - s["full_steps"] for s in stats) > 0, "no check stayed partial"
    elif params.get("refresh", True):
        assert all(s["full_steps"] > 0 for s in stats)
    reference = masked_reference(model, traces_of(cache), ctx, tokens, question=question, chunk_size=chunk)
    diff = (logits - reference).abs().max().item()
    assert diff < LOGIT_TOL, f"{arch}/{mode}: max |dlogit| = {diff:.2e}"


# ------------------------------------------------------------------------------------ measured sizes and C_f
def test_partial_steps_attend_k_plus_the_new_token_and_full_cache_keeps_every_token():
    model = tiny_model("llama")
    ctx = random_ids(N_PROMPT)
    k, stride = 10, 3
    cache = SieveCache(model, refreshkv(budget=k, schedule="fixed", stride=stride), trace=True)
    greedy_with_logits(model, cache, ctx, N_NEW)
    prompt_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ctx]), **cache_kwargs(model, prompt_cache))
    n_seen = N_PROMPT + N_NEW - 1
    for idx, layer in enumerate(_layers(cache)):
        calls = layer.meter.trace[1:]  # decode calls
        for step, positions in enumerate(calls, start=1):
            new = N_PROMPT + step - 1
            if step % stride:  # partial: K entries per KV head + the new token, all distinct
                assert positions.shape[-1] == k + 1
                assert all(len(set(head.tolist())) == k + 1 and new in head.tolist() for head in positions[0])
            else:  # full: every token seen so far
                assert sorted(positions[0, 0].tolist()) == list(range(new + 1))
        policy = layer.policy
        stats = policy.stats()
        assert stats["partial_steps"] == sum(1 for p in calls if p.shape[-1] == k + 1) == N_NEW - 1 - 3
        assert stats["full_steps"] == 3
        # C_f: every prompt and generated token, the prompt's keys exactly those of a full-cache prefill
        cf = policy.store
        assert cf.length == n_seen == layer.get_seq_length() == policy.stored_length()
        assert torch.equal(cf.positions, torch.arange(n_seen, dtype=torch.int32).expand_as(cf.positions))
        assert torch.equal(cf.keys[:, :, :N_PROMPT], prompt_cache.layers[idx].keys)
        assert torch.equal(cf.values[:, :, :N_PROMPT], prompt_cache.layers[idx].values)
        # C_p: K entries per head, gathered from C_f (same key at the same position)
        cp = policy.partial
        assert cp.length == k
        gathered = cf.keys.gather(2, cp.positions.long().unsqueeze(-1).expand(-1, -1, -1, cf.keys.shape[-1]))
        assert torch.equal(cp.keys, gathered)
        # memory: both caches, measured from the tensors
        assert policy.kv_bytes() == cf.keys.nbytes + cf.values.nbytes + cp.keys.nbytes + cp.values.nbytes
        assert stats["full_cache_bytes"] == cf.keys.nbytes + cf.values.nbytes
        assert stats["partial_cache_bytes"] == cp.keys.nbytes + cp.values.nbytes


def test_generate_statistics_are_measured():
    model = tiny_model("qwen2")  # 3 layers, 2 KV heads, head_dim 16, fp32
    out = kvsieve.generate(
        model, IdTokenizer(), random_ids(N_PROMPT), method=refreshkv(budget=0.25, stride=4), max_new_tokens=9
    )
    k, entry_bytes = round(0.25 * N_PROMPT), 2 * 16 * 2 * 4  # per token: 2 heads x 16 dims x (K, V) x fp32
    decode_calls = 8
    assert out.stats.kv_stored_tokens == N_PROMPT  # C_f: nothing leaves the device
    assert out.stats.kv_bytes == 3 * (N_PROMPT + k) * entry_bytes  # L + K after the prompt
    assert out.stats.kv_bytes_end == 3 * (N_PROMPT + decode_calls + k) * entry_bytes
    for layer in out.stats.layers:
        assert layer["budget_tokens"] == k
        assert layer["full_steps"] + layer["partial_steps"] == decode_calls
        assert layer["full_steps"] == 2  # checks at steps 4 and 8; the random model's queries always drift
        assert layer["full_fraction"] == 2 / decode_calls
        assert layer["full_cache_tokens"] == N_PROMPT + decode_calls
        assert layer["partial_cache_tokens"] == k
        # attended: 6 partial steps of K + 1, full steps at 4 and 8 over 52 and 56 entries
        assert layer["attended_mean"] == layer["attended_per_step"] == (6 * (k + 1) + 52 + 56) / decode_calls
        assert layer["query_checks"] == 2 and layer["threshold"] == 0.95


# ------------------------------------------------------------------------------------- question chunk
def test_question_chunk_is_a_full_step_that_rebuilds_the_partial_cache():
    """A multi-token DECODE chunk attends C_f, C_p becomes the top-K of its last token's attention (checked
    against the eager attention of the whole sequence) and the schedule restarts there."""
    model = tiny_model("llama")
    ctx, question = random_ids(N_PROMPT), random_ids(6, seed=7)
    k, stride = 9, 3
    cache = SieveCache(model, refreshkv(budget=k, schedule="fixed", stride=stride), trace=True)
    greedy_with_logits(model, cache, ctx, 1, question=question)  # prefill + question, no decode call yet
    expected = _independent_top_k(model, ctx + question, k)
    for idx, layer in enumerate(_layers(cache)):
        assert layer.meter.trace[1].shape[-1] == N_PROMPT + len(question)  # the chunk attended everything
        kept = [set(head.tolist()) for head in layer.policy.partial.positions[0]]
        assert kept == [set(chosen) for chosen in expected[idx]]
        assert layer.policy.stats()["chunks"] == 1
    # the step counter restarts after the chunk: full steps at decode steps 3 and 6 after it
    cache = SieveCache(model, refreshkv(budget=k, schedule="fixed", stride=stride), trace=True)
    greedy_with_logits(model, cache, ctx, 8, question=question)
    seen = N_PROMPT + len(question)
    for layer in _layers(cache):
        sizes = [p.shape[-1] for p in layer.meter.trace[2:]]
        assert sizes == [k + 1, k + 1, seen + 3, k + 1, k + 1, seen + 6, k + 1]


# ------------------------------------------------------------------------------------ per-layer schedule
def _teacher_forced(model, cache: SieveCache, context: list[int], fed: list[int]) -> torch.Tensor:
    with cache.forward_as(Phase.PREFILL_LAST):
        first = model(input_ids=torch.tensor([context]), logits_to_keep=1, **cache_kwargs(model, cache))
    logits = [first.logits[0, -1]]
    for token in fed:
        logits.append(model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache)).logits[0, -1])
    return torch.stack(logits).float()


def _constant_query_model():
    """Tiny Qwen2 whose layer 0 has a constant pre-RoPE query (q_proj weight 0, a random bias): that layer's query
    never drifts, while layers 1 and 2 (random weights, random tokens) drift at every check."""
    model = tiny_model("qwen2")
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.zero_()
        q_proj.bias.copy_(torch.randn(q_proj.bias.shape, generator=torch.Generator().manual_seed(0)))
    return model


@torch.inference_mode()
def test_each_layer_keeps_its_own_schedule():
    model = _constant_query_model()
    ctx, fed = random_ids(N_PROMPT), random_ids(8, seed=11)
    k, stride, threshold = 10, 2, 0.999
    cache = SieveCache(model, refreshkv(budget=k, stride=stride, threshold=threshold), trace=True)
    logits = _teacher_forced(model, cache, ctx, fed)
    checks = len(fed) // stride
    steady, *drifting = [layer.policy.stats() for layer in _layers(cache)]
    assert steady["query_checks"] == checks and steady["full_steps"] == 0
    assert steady["query_similarity_min"] > 0.9999  # constant pre-RoPE query: cosine 1 up to rounding
    for stats in drifting:
        assert stats["query_checks"] == checks and stats["full_steps"] == checks
        assert stats["query_similarity_max"] < threshold
    sizes = {i: [p.shape[-1] for p in layer.meter.trace[1:]] for i, layer in enumerate(_layers(cache))}
    assert sizes[0] == [k + 1] * len(fed)
    for i in (1, 2):
        assert sizes[i] == [N_PROMPT + s if s % stride == 0 else k + 1 for s in range(1, len(fed) + 1)]
    reference = masked_reference(model, traces_of(cache), ctx, [*fed, 0])
    assert (logits - reference).abs().max().item() < LOGIT_TOL


@torch.inference_mode()
def test_similarity_is_pre_rope(monkeypatch):
    """Negative control for the construction above: comparing post-RoPE queries (no unrotation) sees the constant
    query rotate with its position and sends the steady layer to full steps."""
    model = _constant_query_model()
    monkeypatch.setattr(Rotary, "unrotate", lambda self, x, positions: x)
    cache = SieveCache(model, refreshkv(budget=10, stride=2, threshold=0.999))
    _teacher_forced(model, cache, random_ids(N_PROMPT), random_ids(8, seed=11))
    assert _layers(cache)[0].policy.stats()["full_steps"] > 0


# ----------------------------------------------------------------------------------------- configuration
def test_default_threshold_follows_the_model_family():
    assert all(layer.policy.threshold == 0.85 for layer in _layers(SieveCache(tiny_model("llama"), refreshkv())))
    assert all(layer.policy.threshold == 0.95 for layer in _layers(SieveCache(tiny_model("qwen2"), refreshkv())))
    chosen = SieveCache(tiny_model("qwen2"), refreshkv(threshold=0.5))
    assert all(layer.policy.threshold == 0.5 for layer in _layers(chosen))
    method = refreshkv()
    assert (method.budget, method.stride, method.schedule, method.kernel_size) == (0.125, 10, "query_similarity", 7)


def test_parameter_errors_name_the_parameter():
    with pytest.raises(ValueError, match="schedule must be one of 'query_similarity', 'fixed'"):
        refreshkv(schedule="dynamic")
    with pytest.raises(ValueError, match=r"stride must be in \[1, inf\]"):
        refreshkv(stride=0)
    with pytest.raises(ValueError, match=r"threshold must be in \[-1.0, inf\]"):
        refreshkv(threshold=-2.0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        refreshkv(kernel_size=6)
    with pytest.raises(ValueError, match="gqa_reduce must be one of"):
        refreshkv(gqa_reduce="first")
    with pytest.raises(TypeError, match="refresh must be True or False"):
        refreshkv(refresh="yes")
    with pytest.raises(ValueError, match="budget as a fraction of the prompt"):
        refreshkv(budget=1.5)


# ------------------------------------------------------------------------------------ the default model
_SENTENCES = [
    "The river bends twice before it reaches the old mill, where the water slows and turns dark.",
    "Every spring the village council argues about the bridge, and every spring nothing is decided.",
    "Her grandmother kept bees behind the orchard and sold the honey at the Saturday market.",
    "A narrow path climbs from the harbour to the lighthouse, lined with gorse and stone walls.",
    "The library closes at six, but the caretaker lets students stay until the lamps are lit.",
    "In the winter of that year the snow lay so deep that the school stayed shut for a month.",
    "The baker rises before dawn, lights the oven, and shapes the loaves by the glow of the fire.",
    "Travellers who stop at the inn are told the story of the drowned bell beneath the lake.",
    "The schoolmaster collected fossils and labelled each one in a careful, slanting hand.",
    "When the fair came to town, the square filled with music, lanterns and the smell of roasting nuts.",
    "The blacksmith's son wanted to be a sailor, though he had never seen the open sea.",
    "Rain drummed on the slate roofs while the children counted the seconds between thunder and light.",
]


def _essay(n_tokens: int, tokenizer, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    text, ids = "", []
    while len(ids) < n_tokens:
        text += " " + rng.choice(_SENTENCES)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:n_tokens]


@pytest.mark.slow
def test_default_model_budget_covering_context_equals_full(default_model):
    model, tok = default_model
    ids = _essay(1000, tok)
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    full = kvsieve.generate(model, tok, ids, method="full", **kw)
    ours = kvsieve.generate(model, tok, ids, method=refreshkv(budget=len(ids) + 16, stride=2), **kw)
    assert ours.tokens == full.tokens
    assert all(layer["partial_steps"] > 0 for layer in ours.stats.layers)


@pytest.mark.slow
def test_default_model_query_similarity_equals_masked_reference(default_model):
    """Real queries: at the default threshold (0.85) some checks stay partial and others go full."""
    model, tok = default_model
    ctx = _essay(600, tok, seed=1)
    cache = SieveCache(model, refreshkv(stride=2), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, 8)
    stats = [layer.policy.stats() for layer in _layers(cache)]
    assert all(s["budget_tokens"] == 75 and s["partial_cache_tokens"] == 75 for s in stats)
    assert 0 < sum(s["full_steps"] for s in stats) < sum(s["query_checks"] for s in stats)
    reference = masked_reference(model, traces_of(cache), ctx, tokens)
    assert (logits - reference).abs().max().item() < 1e-3
