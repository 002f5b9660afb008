"""InfLLM (arXiv 2402.04617) on kvsieve's seam: exactness, the per-query reference, retrieval, memory bounds.

* Nothing leaves the window (``n_local`` >= everything): the full cache's tokens, on every architecture.
* Under a real memory: the logits equal a replay on the full cache where each query attends exactly the traced
  entries -- within ``n_local`` of it with the model's RoPE, the others pre-RoPE against its query rotated by the
  single angle of ``n_local - 1`` -- in one softmax (`infllm_reference`).
* Representative keys, retrieval of a matching block, the device cache's LRU, device bytes bounded while the host
  store grows, the budget mapping and clear errors.
* The default model: equal to the full cache at ~1K tokens; a passkey in a 12K-token prompt (beyond its 8K
  window) at 2K attended entries.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

import kvsieve
from helpers import TINY_CONFIGS, greedy_with_logits, random_ids, teacher_forced_replay, tiny_model, traces_of
from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import LayerInfo, Phase
from kvsieve.ops.block_store import AttendedBuffer, BlockStore, DeviceBlockCache
from kvsieve.ops.rope import Rotary
from kvsieve.rows import LayerMeter

N_PROMPT, N_NEW = 48, 10
LOGIT_TOL = 1e-4  # fp32; explicit softmax vs sdpa / vs the replay: measured ~2e-6
SMALL = dict(n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8, repr_topk=2)


# ------------------------------------------------------------------------------------------ the reference


@torch.inference_mode()
def infllm_reference(model, traces, context, tokens, n_local, exc, chunk_size=None, window_starts=None):
    """Replay the run on a full cache: per window of ``exc`` queries (one trace entry each; the last prompt token is
    a window of its own), query ``p`` attends the traced entries ``j`` with ``0 <= p - j < n_local`` with the
    model's RoPE and the others pre-RoPE against its query rotated at ``n_local - 1``, in one softmax.
    ``window_starts`` (layer -> per window, the first position still in the policy's window: `spy_window_starts`)
    also puts entries before it in memory: with a budget a decode step hands a whole block to memory before all of
    its tokens are ``n_local`` away. Teacher-forced; returns logits."""
    counters = dict.fromkeys(traces, 0)
    layer_types = getattr(model.config, "layer_types", None)

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer not in traces:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        rotary = Rotary(model.config, layer_types[layer] if layer_types else None)
        b, h, c, _ = query.shape
        n_kv, total = key.shape[1], key.shape[2]
        g = h // n_kv
        kpos = torch.arange(total)
        qpos_all = torch.arange(total - c, total)
        q_mem_all = rotary.rotate(rotary.unrotate(query, qpos_all), torch.tensor(n_local - 1))
        keys, keys_pre = repeat_kv(key, g), repeat_kv(rotary.unrotate(key, kpos), g)
        values = repeat_kv(value, g)
        outs = []
        # the last prompt token is a window of its own (the chunk that completes the prompt)
        head = c - 1 if c > 1 and total == len(context) else c
        bounds = [(start, min(head, start + exc)) for start in range(0, head, exc)] + ([(head, c)] if head < c else [])
        for start, stop in bounds:
            attended = traces[layer][counters[layer]].long()
            window_start = window_starts[layer][counters[layer]] if window_starts else 0
            counters[layer] += 1
            allowed = torch.zeros(b, n_kv, total, dtype=torch.bool).scatter_(2, attended, True)
            allowed = allowed.repeat_interleave(g, dim=1)[:, :, None, :]  # [b, h, 1, total]
            dist = qpos_all[start:stop, None] - kpos[None, :]
            in_window = (dist >= 0) & (dist < n_local) & (kpos >= window_start)
            local = allowed & in_window
            memory = allowed & ~in_window & (dist > 0)
            l_loc = query[:, :, start:stop] @ keys.transpose(-1, -2) * scaling
            l_mem = q_mem_all[:, :, start:stop] @ keys_pre.transpose(-1, -2) * scaling
            logits = torch.where(local, l_loc, torch.where(memory, l_mem, torch.tensor(float("-inf"))))
            outs.append(logits.softmax(dim=-1) @ values)
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    logits = teacher_forced_replay(model, attention, context, tokens, chunk_size=chunk_size)
    for layer, count in counters.items():
        assert count == len(traces[layer]), f"layer {layer}: replayed {count} windows, traced {len(traces[layer])}"
    return logits


def spy_window_starts(cache):
    """Per layer, a list that fills with the first position still in the policy's window at every window."""
    starts = {}
    for i, layer in enumerate(cache.layers):  # indexed as `traces_of`: by layer, kvsieve layers only
        if not isinstance(layer, SieveLayer):
            continue
        policy, original, log = layer.policy, layer.policy.attend_window, starts.setdefault(i, [])

        def spy(*args, _policy=policy, _original=original, _log=log):
            _log.append(_policy.recent.first_position)
            return _original(*args)

        policy.attend_window = spy
    return starts


def run_against_reference(model, method, n_prompt=120, chunk_size=40, seed=1, layout=None, n_new=N_NEW):
    """Greedy run with ``method`` (traced; ``layout``: the cache's prompt layout) and its replay; returns (cache,
    tokens, max |dlogit|)."""
    ctx = random_ids(n_prompt, seed=seed)
    cache = SieveCache(model, method, trace=True)
    if layout is not None:
        cache.layout = layout
    starts = spy_window_starts(cache)
    tokens, logits = greedy_with_logits(model, cache, ctx, n_new, chunk_size=chunk_size)
    reference = infllm_reference(
        model, traces_of(cache), ctx, tokens, method.n_local, method.exc_block_size, chunk_size, starts
    )
    return cache, tokens, (logits - reference).abs().max().item()


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_nothing_leaves_the_window_equals_full(arch):
    model = tiny_model(arch)
    ctx = random_ids(N_PROMPT)
    ref_tokens, ref_logits = greedy_with_logits(model, DynamicCache(config=model.config), ctx, N_NEW)
    method = kvsieve.method("infllm", n_init=4, n_local=64, block_size=8, topk=2, exc_block_size=16)
    cache = SieveCache(model, method)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW, chunk_size=20)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < LOGIT_TOL
    layer = cache.sieve_layers[0].policy
    assert layer.memory.n_blocks == 0 and layer.init_len == 0  # really nothing left the window


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("chunk_size", [None, 20])
def test_equals_the_per_query_reference(arch, chunk_size):
    model = tiny_model(arch)
    cache, _, diff = run_against_reference(model, kvsieve.method("infllm", **SMALL), chunk_size=chunk_size)
    policy = cache.sieve_layers[0].policy
    assert policy.memory.n_blocks > SMALL["topk"] and policy.init_len == SMALL["n_init"]  # retrieval really chose
    assert diff < LOGIT_TOL, f"{arch}: max |dlogit| = {diff:.2e}"


@pytest.mark.parametrize("name", ["infllm", "actqkv"])
def test_with_a_budget_equals_the_per_query_reference(name):
    """With ``strict_budget`` a decode step hands its oldest whole block to memory before attending (`hold_budget`): the
    block is then read at the memory's fixed distance when retrieved, like every block. Exact against the replay,
    and the run really retrieved such a block while some of its tokens were nearer than ``n_local``."""
    model = tiny_model("llama")
    structure = {k: v for k, v in SMALL.items() if k != "topk"}  # topk from the budget: 3
    extra = {} if name == "infllm" else {"min_blocks": 1, "warmup_calls": 4}
    method = kvsieve.method(name, **structure, **extra, budget=32, strict_budget=True)
    assert method.topk == SMALL["topk"]
    ctx, n_new, chunk = random_ids(120), 24, 40
    cache = SieveCache(model, method, trace=True)
    starts = spy_window_starts(cache)
    tokens, logits = greedy_with_logits(model, cache, ctx, n_new, chunk_size=chunk)
    reference = infllm_reference(
        model, traces_of(cache), ctx, tokens, method.n_local, method.exc_block_size, chunk, starts
    )
    assert (logits - reference).abs().max().item() < LOGIT_TOL
    near = 0  # decode steps that read a retrieved block with tokens nearer than n_local
    for i, layer in enumerate(cache.layers):
        for query, trace, start in zip(
            range(len(ctx), len(ctx) + n_new), layer.meter.trace[-(n_new - 1) :], starts[i][-(n_new - 1) :]
        ):
            positions = trace[0, 0].tolist()
            assert len(positions) <= method.budget and positions[-1] == query
            near += any(p < start and query - p < method.n_local for p in positions)
    assert near > 0


@pytest.mark.parametrize("strategy", ["lru", "lru-s"])
def test_a_small_device_cache_changes_nothing_but_traffic(strategy):
    """The cache only decides what is copied from the host: offloaded behind a cache of exactly topk blocks, the
    logits equal those read from the store directly (a CPU model's default) and those of a large cache."""
    model = tiny_model("llama")
    ctx = random_ids(120)
    direct = SieveCache(model, kvsieve.method("infllm", **SMALL))
    _, direct_logits = greedy_with_logits(model, direct, ctx, N_NEW, chunk_size=40)
    assert direct.sieve_layers[0].policy.memory.cache is None  # offload=None on a CPU: no device cache
    large = SieveCache(model, kvsieve.method("infllm", **SMALL, offload=True, max_cached_block=64))
    assert torch.equal(greedy_with_logits(model, large, ctx, N_NEW, chunk_size=40)[1], direct_logits)
    method = kvsieve.method("infllm", **SMALL, max_cached_block=3, cache_strategy=strategy, offload=True)
    small = SieveCache(model, method)
    _, logits = greedy_with_logits(model, small, ctx, N_NEW, chunk_size=40)
    assert torch.equal(logits, direct_logits)
    stats = small.sieve_layers[0].policy.stats()
    assert stats["cached_blocks"] == 3 and stats["cache_loads"] > stats["host_blocks"]  # blocks were reloaded


def test_the_reference_is_sharp():
    """Dropping one traced memory block from the replay changes the logits: the traces are what was attended."""
    model = tiny_model("llama")
    ctx = random_ids(120)
    method = kvsieve.method("infllm", **SMALL)
    cache = SieveCache(model, method, trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW, chunk_size=40)
    traces = traces_of(cache)
    for layer_traces in traces.values():
        last = layer_traces[-1]  # the last decode step: init (4) then the first retrieved block
        layer_traces[-1] = torch.cat([last[:, :, :4], last[:, :, 4 + SMALL["block_size"] :]], dim=2)
    reference = infllm_reference(model, traces, ctx, tokens, method.n_local, method.exc_block_size, 40)
    assert (logits[-1] - reference[-1]).abs().max().item() > 1e-3


def test_attended_entries_and_positions():
    """A decode step attends init + topk blocks + the window + the partial block outside it, and nothing else."""
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("infllm", **SMALL), trace=True)
    greedy_with_logits(model, cache, random_ids(120), N_NEW, chunk_size=40)
    bs, n_local = SMALL["block_size"], SMALL["n_local"]
    for layer in cache.sieve_layers:
        last = layer.meter.trace[-1][0, 0]
        seen = layer.seen
        assert last[: SMALL["n_init"]].tolist() == list(range(SMALL["n_init"]))
        blocks = last[SMALL["n_init"] : SMALL["n_init"] + SMALL["topk"] * bs].view(-1, bs)
        assert ((blocks - blocks[:, :1]) == torch.arange(bs)).all()  # whole blocks
        recent = last[SMALL["n_init"] + SMALL["topk"] * bs :]
        assert recent[-1].item() == seen - 1 and n_local <= len(recent) < n_local + bs + 1
        assert recent.tolist() == list(range(recent[0].item(), seen))
        assert len(last) == len(set(last.tolist()))


@pytest.mark.parametrize("name", ["infllm", "actqkv"])
def test_attended_counts_do_not_depend_on_tracing(name):
    """The positions a window attended are built only when the cache traces; the counts are the same either way
    and equal the traced positions' (a lazy record whose count were off would fail here, or in `LayerMeter`)."""
    model = tiny_model("llama")
    meters = []
    for trace in (False, True):
        cache = SieveCache(model, kvsieve.method(name, **SMALL), trace=trace)
        greedy_with_logits(model, cache, random_ids(120), N_NEW, chunk_size=40)
        meters.append([layer.meter for layer in cache.sieve_layers])
    for plain, traced in zip(*meters):
        assert plain.trace is None and (plain.attended_total, plain.attend_calls) == (
            traced.attended_total,
            traced.attend_calls,
        )
        assert traced.attended_total == sum(t.shape[-1] for t in traced.trace) > 0


def test_a_lazy_record_is_built_only_when_tracing_and_must_match_its_count():
    built = []

    def positions():
        built.append(1)
        return torch.arange(5)[None, None]

    plain, traced = LayerMeter(), LayerMeter(trace=[])
    plain.record(positions, 5)
    traced.record(positions, 5)
    assert built == [1] and plain.attended_total == traced.attended_total == 5 and len(traced.trace) == 1
    with pytest.raises(ValueError, match="4 counted"):
        traced.record(positions, 4)
    with pytest.raises(ValueError, match="needs their count"):
        plain.record(positions)


@pytest.mark.parametrize("name", ["infllm", "actqkv"])
def test_batch_rows_are_independent(name):
    """Two prompts in one batch get what each gets alone: retrieval, cache and statistics are per row."""
    model = tiny_model("llama")
    params = dict(SMALL) if name == "infllm" else dict(SMALL, warmup_calls=4, dynamic_topk=False)
    prompts = [random_ids(120, seed=5), random_ids(120, seed=6)]
    follow = [[7, 8, 9, 10], [11, 12, 13, 14]]

    def run(rows):
        cache = SieveCache(model, kvsieve.method(name, **params))
        out = []
        with torch.inference_mode():
            for i, chunk in enumerate(range(0, 120, 40)):
                ids = torch.tensor([prompts[r][chunk : chunk + 40] for r in rows])
                with cache.forward_as(Phase.PREFILL_LAST if i == 2 else Phase.PREFILL):
                    out.append(model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1])
            for step in range(4):
                ids = torch.tensor([[follow[r][step]] for r in rows])
                out.append(model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1])
        return torch.stack(out, dim=1)  # [rows, steps, V]

    both = run([0, 1])
    alone = torch.cat([run([0]), run([1])])
    assert (both - alone).abs().max().item() < LOGIT_TOL


# ------------------------------------------------------------------------------------- block memory
def _policy(method, arch="llama"):
    model = tiny_model(arch)
    cfg = model.config
    info = LayerInfo(0, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, 16, cfg)
    return method.make_policy(info), model


def test_representative_is_the_mean_of_the_most_attended_pre_rope_keys():
    method = kvsieve.method("infllm", n_init=0, n_local=4, block_size=4, topk=1, exc_block_size=4, repr_topk=2)
    policy, _ = _policy(method)
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    policy.update(keys, values, 0, Phase.PREFILL)
    scores = torch.rand(1, 4, 8)
    policy.recent.scores[:] = scores
    policy.advance(8)  # 8 tokens seen, window 4: the first block leaves
    assert policy.memory.n_blocks == 1
    pre = policy.rotary.unrotate(keys[:, :, :4], torch.arange(4))
    expected = []
    for head in range(4):  # GQA: query head h reads KV head h // 2
        top = scores[0, head, :4].topk(2).indices
        expected.append(pre[0, head // 2, top].mean(dim=0))
    assert torch.allclose(policy.memory.reprs[0, 0], torch.cat(expected), atol=1e-6)
    host_k, host_v = policy.memory.store.block(0, 0)
    assert torch.allclose(host_k, pre[0], atol=1e-6) and torch.equal(host_v, values[0, :, :4])


def test_retrieval_finds_the_matching_block():
    """Among random blocks, the one whose representative matches the window's probe is retrieved first."""
    method = kvsieve.method("infllm", n_init=0, n_local=8, block_size=4, topk=1, exc_block_size=8, repr_topk=1)
    policy, _ = _policy(method)
    torch.manual_seed(0)
    n_blocks, target = 12, 7
    q_mem = torch.randn(1, 4, 8, 16)  # a window's memory queries
    probe = q_mem.mean(dim=2).reshape(1, -1)
    policy.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0, Phase.PREFILL)
    for j in range(n_blocks):
        rep = 2 * probe / probe.norm() if j == target else torch.randn(1, 64) * 0.3
        policy.memory.add(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), rep, 8 + 4 * j)
    call = type("Call", (), {"phase": Phase.DECODE})()
    assert policy.select_blocks(call, q_mem, 0).tolist() == [[target]]
    policy.topk = 4
    chosen = policy.select_blocks(call, q_mem, 0)
    assert target in chosen[0].tolist() and chosen.shape == (1, 4)


def test_device_cache_lru_and_lru_s():
    host = BlockStore()
    for j in range(6):
        host.append(torch.full((1, 2, 4, 8), float(j)), torch.full((1, 2, 4, 8), -float(j)))
    cache = DeviceBlockCache(capacity=3, strategy="lru")
    dev = torch.device("cpu")
    cache.load([[0, 1]], host, dev)
    cache.load([[2]], host, dev)
    slots = cache.load([[1, 3]], host, dev)  # full: evicts the least recently used block not selected: 0
    assert sorted(cache.slot_of[0]) == [1, 2, 3]
    keys, values, order = AttendedBuffer(capacity=3).gather(cache.slots, slots, [[1, 3]])
    assert order == [[1, 3]]  # the first layout follows the selection
    assert keys[0, 0, :4, 0].tolist() == [1.0] * 4 and keys[0, 0, 4:, 0].tolist() == [3.0] * 4
    assert values[0, 1, 4:, 0].tolist() == [-3.0] * 4
    assert (cache.loads, cache.hits) == (4, 1)
    assert cache._k.data_ptr() != host._k.data_ptr() and cache.allocated_slots <= 3
    scored = DeviceBlockCache(capacity=2, strategy="lru-s", decay=0.5)
    scored.load([[0, 1]], host, dev)
    scored.credit([[0, 1]], torch.tensor([[1.0, 0.1]]))  # block 0 got most attention
    scored.load([[2]], host, dev)  # evicts the lowest score: block 1
    assert sorted(scored.slot_of[0]) == [0, 2]


@pytest.mark.parametrize("offload", [True, False])
def test_device_bytes_stay_bounded_while_the_host_store_grows(offload):
    """Offloaded: the window, init tokens and at most max_cached_block cached blocks on the device; read from the
    store in host memory (a CPU model): the window, init tokens and the topk blocks laid out for attention."""
    model = tiny_model("llama")
    method = kvsieve.method(
        "infllm", n_init=4, n_local=32, block_size=8, topk=3, exc_block_size=16, max_cached_block=5, offload=offload
    )
    cache = SieveCache(model, method)
    per_token = 2 * model.config.num_key_value_heads * 16 * 4  # K and V, fp32, one row
    blocks = 5 if offload else 3
    bound = (method.n_local + method.block_size + method.n_init + blocks * method.block_size) * per_token
    ids = random_ids(600, seed=3)
    host_seen = []
    with torch.inference_mode():
        for i in range(0, 600, 50):
            with cache.forward_as(Phase.PREFILL if i + 50 < 600 else Phase.PREFILL_LAST):
                model(input_ids=torch.tensor([ids[i : i + 50]]), **cache_kwargs(model, cache))
            for layer in cache.sieve_layers:
                p = layer.policy
                assert p.kv_bytes() <= bound
                assert p.host_bytes() == p.memory.n_blocks * method.block_size * per_token
                assert p.memory.resident_blocks() <= blocks
                if offload:
                    assert max(p.memory.cache.occupied()) <= 5 and p.memory.cache.allocated_slots <= 5
                else:
                    assert p.memory.cache is None
            host_seen.append(cache.sieve_layers[0].policy.host_bytes())
        for _ in range(20):
            model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, cache))
            assert all(layer.policy.kv_bytes() <= bound for layer in cache.sieve_layers)
    assert host_seen == sorted(host_seen) and host_seen[-1] > 5 * bound  # host grows with the prompt
    stats = cache.sieve_layers[1].policy.stats()
    assert stats["device_bytes_peak"] <= bound and stats["retrieved_blocks_decode_max"] == 3


def test_stats_and_generate():
    model = tiny_model("qwen2")
    method = kvsieve.method("infllm", **SMALL)
    out = kvsieve.generate(model, _IdTokenizer(), random_ids(100), method=method, max_new_tokens=6, chunk_size=32)
    layer = out.stats.layers[0]
    assert layer["retrieved_blocks_decode_mean"] == 3 and layer["host_blocks"] > 10
    assert out.stats.kv_bytes_end == sum(entry["device_bytes"] for entry in out.stats.layers)
    assert 0 < out.stats.kv_bytes < sum(entry["host_bytes"] for entry in out.stats.layers)
    # the comparison is with a plain cache of the whole prompt, not with what the device holds
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert out.stats.kv_bytes_full == n_layers * 100 * 2 * n_kv * 16 * 4
    bs = SMALL["block_size"]
    budget = SMALL["n_init"] + SMALL["n_local"] + SMALL["topk"] * bs
    assert budget <= out.stats.attended_per_step <= budget + bs
    assert method.budget_label == budget


class _IdTokenizer:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


# ------------------------------------------------------------------------------------- configuration
def test_budget_maps_to_topk_and_presets():
    m = kvsieve.method("infllm", n_init=64, n_local=512, block_size=32, budget=2048)
    assert m.blocks_per_step == 46 and m.budget_label == 2048 and m.cache_blocks == 128  # 2 x 46, a power of two
    assert kvsieve.method("infllm-2k").blocks_per_step == 46
    rescaled = kvsieve.method("infllm-2k", budget=4096)  # the preset is the derivation: all of it rescales
    assert (rescaled.n_init, rescaled.n_local, rescaled.block_size, rescaled.topk) == (128, 1024, 64, 46)
    paper = kvsieve.method("infllm")
    assert (paper.n_init, paper.n_local, paper.block_size, paper.blocks_per_step) == (128, 4096, 128, 16)
    assert (paper.repr_topk, paper.exc_block_size, paper.cache_blocks) == (4, 512, 32)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"topk=80 cannot fit budget=2048"):
        kvsieve.method("infllm-2k", topk=80)
    with pytest.raises(ValueError, match=r"budget=0.2 of a 1000-token prompt is 200 entries: n_local=4096 cannot fit"):
        kvsieve.method("infllm", budget=0.2, n_local=4096).for_prompt(1000)
    with pytest.raises(ValueError, match=r"resolve it with method.for_prompt"):
        SieveCache(tiny_model("llama"), kvsieve.method("infllm", **{**SMALL, "topk": None}, budget=0.5))
    with pytest.raises(ValueError, match=r"budget must be an int >= 32"):
        kvsieve.method("infllm", budget=16)
    with pytest.raises(ValueError, match=r"exc_block_size must be in \[1, 512\]"):
        kvsieve.method("infllm-2k", exc_block_size=1024)
    with pytest.raises(ValueError, match=r"repr_topk must be in \[1, 32\]"):
        kvsieve.method("infllm-2k", repr_topk=64)
    with pytest.raises(ValueError, match=r"max_cached_block must be in \[46, inf\]"):
        kvsieve.method("infllm-2k", max_cached_block=10)
    with pytest.raises(ValueError, match="cache_strategy must be one of"):
        kvsieve.method("infllm", cache_strategy="fifo")


def test_fractional_budget_resolves_per_prompt():
    """A fraction becomes round(budget x n) entries and the structure is derived there, keeping what was set (here
    n_init, n_local and block_size: the blocks take the rest); running it equals running the resolved int budget."""
    params = {**SMALL, "topk": None}
    fraction = kvsieve.method("infllm", **params, budget=0.5)
    resolved = fraction.for_prompt(100)
    assert resolved.budget == 50 and resolved.blocks_per_step == (50 - 4 - 16) // 4
    assert fraction.budget == 0.5 and kvsieve.method("infllm", **params, budget=50).for_prompt(7).budget == 50
    preset = kvsieve.method("actqkv-2k", budget=0.25).for_prompt(8000)
    assert preset.name == "actqkv-2k" and preset == kvsieve.method("actqkv", budget=2000)
    model, ids = tiny_model("llama"), random_ids(96)
    by_fraction = kvsieve.generate(model, _IdTokenizer(), ids, method=fraction, max_new_tokens=5, chunk_size=32)
    by_int = kvsieve.generate(
        model,
        _IdTokenizer(),
        ids,
        method=kvsieve.method("infllm", **params, budget=48),
        max_new_tokens=5,
        chunk_size=32,
    )
    assert by_fraction.tokens == by_int.tokens and by_fraction.stats.budget == 48


# ------------------------------------------------------------------------------------- default model
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information.\n\n"
)


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> str:
    """InfiniteBench passkey: noise lines, the needle at ``depth``, the question at the end (~``n_tokens``)."""
    per_line = len(tokenizer(NOISE, add_special_tokens=False)["input_ids"])
    lines = n_tokens // per_line
    at = int(lines * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    return INTRO + NOISE * at + needle + NOISE * (lines - at) + "\n\nWhat is the pass key?"


@pytest.fixture(scope="module")
def window_prompt(default_model):
    """~1K tokens of real text (chat template applied) and the full cache's greedy tokens and logits."""
    model, tok = default_model
    from kvsieve.prompts import encode_prompt

    ids, _ = encode_prompt(tok, passkey_prompt(tok, 1000, 0.3, "52719"))
    tokens, logits = greedy_with_logits(model, DynamicCache(config=model.config), ids, 8)
    return ids, tokens, logits


@pytest.mark.slow
def test_default_model_window_covers_the_prompt_equals_full(default_model, window_prompt):
    model, _ = default_model
    ids, ref_tokens, ref_logits = window_prompt
    method = kvsieve.method("infllm", n_init=64, n_local=2048, block_size=32, topk=4, exc_block_size=256)
    tokens, logits = greedy_with_logits(model, SieveCache(model, method), ids, 8, chunk_size=512)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-3


@pytest.mark.slow
def test_default_model_passkey_beyond_its_window(default_model):
    """12K tokens (the model's window: 8K) at 2K attended entries: the needle's block is retrieved and read."""
    model, tok = default_model
    out = kvsieve.generate(
        model, tok, passkey_prompt(tok, 12_000, 0.5, "71432"), method="infllm-2k", max_new_tokens=12, chunk_size=4096
    )
    assert out.stats.prompt_tokens > 11_500
    assert "71432" in out.text
    assert 2048 < out.stats.attended_per_step <= 2048 + 32  # as released: the partial block outside the window too
