"""Compress once, ask many; one driver; one question channel; a spent cache refused.

``kvsieve.compress(model, tok, context, method).generate(q)`` must return what ``kvsieve.generate(model, tok,
context, question=q, method=...)`` returns, token for token and statistic for statistic, for every registered method
and preset; the compressed context must stay as it was after any number of questions.
"""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import IdTokenizer, random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods.base import Phase, PromptLayout
from kvsieve.prefill_sharing import shared_prefill

N_CONTEXT, N_QUESTION, N_NEW = 150, 8, 6
# block structures a 150-token prompt exercises (retrieval happens); presets keep their own settings
SMALL_BLOCKS = dict(n_init=4, n_local=32, block_size=8, exc_block_size=16, topk=2)


def small(info: kvsieve.MethodInfo) -> kvsieve.Method:
    """The method at a size that evicts or retrieves on a 150-token prompt (presets as registered)."""
    if info.preset_of is not None:
        return kvsieve.method(info.name)
    if "n_local" in info.params:
        extra = {"min_blocks": 1} if "min_blocks" in info.params else {}
        return kvsieve.method(info.name, **SMALL_BLOCKS, **extra)
    if "budget" in info.params:
        return kvsieve.method(info.name, budget=24)
    return kvsieve.method(info.name)


def same_output(a: kvsieve.GenerationOutput, b: kvsieve.GenerationOutput) -> None:
    assert a.tokens == b.tokens and a.text == b.text and a.stop_reason == b.stop_reason
    sa, sb = a.stats, b.stats
    for name in ("prompt_tokens", "question_tokens", "new_tokens", "kv_stored_tokens_per_layer", "kv_bytes"):
        assert getattr(sa, name) == getattr(sb, name), name
    assert (sa.kv_bytes_full, sa.kv_bytes_end, sa.attended_per_step) == (
        sb.kv_bytes_full,
        sb.kv_bytes_end,
        sb.attended_per_step,
    )
    assert [{k: v for k, v in la.items()} for la in sa.layers] == [{k: v for k, v in lb.items()} for lb in sb.layers]


@pytest.mark.parametrize("info", kvsieve.methods(), ids=lambda info: info.name)
def test_compress_then_generate_equals_generate_with_the_question(info):
    model = tiny_model("llama")
    tok = IdTokenizer()
    method = small(info)
    context = random_ids(N_CONTEXT)
    questions = [random_ids(N_QUESTION, seed=s) for s in (11, 12)]
    ctx = kvsieve.compress(model, tok, context, method)
    stored = ctx.cache.stored_tokens()
    for q in questions:
        got = ctx.generate(q, max_new_tokens=N_NEW)
        want = kvsieve.generate(model, tok, context, method, max_new_tokens=N_NEW, question=q)
        same_output(got, want)
        assert got.stats.question_tokens == N_QUESTION
    # the compressed context itself never read a question
    assert ctx.cache.tokens_seen() == N_CONTEXT and ctx.cache.stored_tokens() == stored
    assert ctx.compressed == (not method.compress_after_question)


def test_compress_chunked_and_sampled_equal_generate():
    model = tiny_model("qwen2")
    tok = IdTokenizer()
    context, q = random_ids(N_CONTEXT), random_ids(N_QUESTION, seed=3)
    method = kvsieve.method("snapkv", budget=0.2)
    ctx = kvsieve.compress(model, tok, context, method, chunk_size=40)
    got = ctx.generate(q, max_new_tokens=N_NEW, temperature=1.0, seed=7)
    want = kvsieve.generate(model, tok, context, method, N_NEW, question=q, chunk_size=40, temperature=1.0, seed=7)
    same_output(got, want)
    assert got.stats.kv_stored_tokens_per_layer == [30] * 3  # 0.2 of the context, not of context + question


def test_compress_refuses_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="context is empty"):
        kvsieve.compress(model, IdTokenizer(), "  ")
    ctx = kvsieve.compress(model, IdTokenizer(), random_ids(20), "snapkv")
    with pytest.raises(ValueError, match="question is required"):
        ctx.generate(None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ctx.generate([5, 6], max_new_tokens=0)


def test_the_last_question_may_take_the_compressed_cache_itself():
    """`ask(reuse=True)` (the eval runner's last question on a context) answers as a copy would, then the context
    is spent: a later question is refused instead of reading a cache that holds the last one."""
    model = tiny_model("llama")
    context, q1, q2 = random_ids(N_CONTEXT), random_ids(N_QUESTION, seed=3), random_ids(N_QUESTION, seed=4)
    ctx = kvsieve.compress(model, IdTokenizer(), context, kvsieve.method("snapkv", budget=24))
    _, from_copy = ctx.ask(q1)
    _, again = ctx.ask(q1)
    assert torch.equal(from_copy, again)  # a copy leaves the compressed context as it was
    _, from_copy = kvsieve.compress(model, IdTokenizer(), context, kvsieve.method("snapkv", budget=24)).ask(q2)
    _, from_itself = ctx.ask(q2, reuse=True)
    assert torch.equal(from_itself, from_copy)
    with pytest.raises(RuntimeError, match="last question"):
        ctx.ask(q1)


def test_a_spent_cache_is_refused_for_a_second_prompt():
    model = tiny_model("llama")
    prompt = torch.tensor([random_ids(40)])
    cache = SieveCache(model, kvsieve.method("snapkv", budget=16))
    model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
    # a longer, an equal-plus-one (the tail would be one decode step) and a shorter second prompt
    for n in (60, 44, 45, 20):
        second = torch.tensor([random_ids(n, seed=4)])
        with pytest.raises(RuntimeError, match="already holds a prompt"):
            model.generate(second, cache=cache, max_new_tokens=4, do_sample=False)
    assert cache.tokens_seen() == 43  # nothing of the second prompts was read
    with pytest.raises(RuntimeError, match="already holds a prompt"):  # a forward outside generate, automatic
        model(input_ids=torch.tensor([random_ids(3)]), **cache_kwargs(model, cache))
    with pytest.raises(RuntimeError, match="already holds a prompt"):
        Driver(model, cache).prefill(random_ids(30))


def test_the_driver_builds_no_autograd_graph():
    """Called outside any no_grad / inference_mode (as a user may), the driver's forwards keep no graph: the logits
    need no grad, and InfLLM's decode steps write into its attended buffer (whose views refuse in-place writes
    under autograd)."""
    model = tiny_model("llama")
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    small = dict(n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8, repr_topk=2, offload=False)
    driver = Driver.new(model, kvsieve.method("infllm", **small), 60, reserve=8)
    logits = driver.prefill(random_ids(60))
    for _ in range(3):
        logits = driver.step(int(logits[0].argmax()))
    assert not logits.requires_grad and torch.is_grad_enabled()


def test_the_phase_lasts_one_forward():
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("full"))
    with torch.inference_mode(), cache.forward_as(Phase.PREFILL):
        assert all(layer.next_phase is Phase.PREFILL for layer in cache.sieve_layers)
        model(input_ids=torch.tensor([random_ids(10)]), **cache_kwargs(model, cache))
    assert all(layer.next_phase is None for layer in cache.sieve_layers)
    assert all(layer.meter.stored_after_prefill is None for layer in cache.sieve_layers)  # not complete yet


def test_query_aware_layout_reaches_every_policy():
    """The question inside the prompt reaches NACL (its proxies) and ActQKV (its question term) through the
    cache's layout, in a shared prefill and in a method's own, the same way."""
    model = tiny_model("llama")
    context, q = random_ids(N_CONTEXT), random_ids(N_QUESTION, seed=5)
    span = (N_CONTEXT, N_CONTEXT + N_QUESTION)
    layout = PromptLayout(question=span)
    nacl = kvsieve.method("nacl", budget=40)
    with torch.inference_mode():
        shared = shared_prefill(model, [nacl], context + q, layout=layout)
        alone = Driver.new(model, nacl, N_CONTEXT + N_QUESTION)
        alone.prompt(context, q, question_in_prompt=True)
    for cache in (shared.caches[0], alone.cache):
        stats = [layer.policy.stats() for layer in cache.sieve_layers]
        assert all(s["proxy_source"] == "question" and s["proxy_tokens"] == N_QUESTION for s in stats)
    kept = [[layer.policy.store.positions.clone() for layer in c.sieve_layers] for c in (shared.caches[0], alone.cache)]
    assert all(torch.equal(a, b) for a, b in zip(*kept))
    # ActQKV: a query-aware prompt's span reaches its question term, whether the driver lays the prompt out or the
    # caller hands the layout to prefill; without a layout there is no question term
    params = dict(SMALL_BLOCKS, min_blocks=1, warmup_calls=2)
    via_prompt, via_prefill, without = (
        Driver.new(model, kvsieve.method("actqkv", **params), N_CONTEXT + N_QUESTION) for _ in range(3)
    )
    with torch.inference_mode():
        a = via_prompt.prompt(context, q, question_in_prompt=True)
        b = via_prefill.prefill(context + q, layout=layout)
        c = without.prefill(context + q)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(layer.policy.stats()["question_vector"] for layer in via_prompt.cache.sieve_layers)
    assert not any(layer.policy.stats()["question_vector"] for layer in without.cache.sieve_layers)


def test_prompt_layout_is_validated():
    with pytest.raises(ValueError, match="question must be"):
        PromptLayout(question=(5, 5))
    with pytest.raises(TypeError, match="layout must be"):
        SieveCache(tiny_model("llama"), "full").layout = (0, 4)
