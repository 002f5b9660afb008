"""What every registered method and preset must do, one parametrized test per property, driven by
`kvsieve.methods()` (a new method or preset is checked as soon as it is registered):

* a budget that covers the prompt and the answer keeps everything: ``model.generate`` with its `SieveCache` gives
  the tokens of a plain `DynamicCache`;
* under a real budget, the logits equal a replay on the full cache in which each query attends exactly the entries
  the method let it attend (the masked reference; InfLLM-style block methods have their own replay, since retrieved
  blocks are attended at a shifted position);
* the same parameters give the same tokens and the same attended entries; a seed, where a method has one, changes
  its random choices;
* a bad value for any parameter is refused at construction, in one line that names the parameter.

What a method's budget counts (entries stored, or attended per step) is checked in tests/test_budgets_stored.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import greedy_with_logits, masked_reference, random_ids, tiny_model, traces_of
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.infllm import InfLLM
from test_infllm import infllm_reference

N_PROMPT, N_NEW, CHUNK = 96, 8, 40
COVERING_BUDGET = 1024  # far above prompt + answer: no method may drop or move anything
REAL_BUDGET = 32  # a third of the prompt
LOGIT_TOL = 1e-4  # fp32: the same attention computed by different kernels and summation orders

# How a method's attention under a budget is replayed on the full cache: each query attends the traced entries at
# their own positions (the masked reference), except InfLLM-style block memories (InfLLM, ActQKV), whose retrieved
# blocks are read at a fixed distance (their own replay). A new method is replayed like the first kind unless it
# derives from InfLLM; one that moves entries in another way adds its replay here.
MASKED, BLOCKS = "masked", "blocks"


def replay_kind(method) -> str:
    return BLOCKS if isinstance(method, InfLLM) else MASKED


INFOS = {info.name: info for info in kvsieve.methods()}
NAMES = sorted(INFOS)


def build(name: str, budget: int, **params):
    """``name`` at ``budget``; a preset that fixes its whole structure (a released configuration) refuses another
    budget, naming what it fixed, and runs at its own (then on a prompt long enough for it to evict)."""
    if "budget" not in INFOS[name].params:
        return kvsieve.method(name, **params)
    try:
        return kvsieve.method(name, budget=budget, **params)
    except ValueError as refused:
        assert "cannot fit budget" in str(refused), refused
        return kvsieve.method(name, **params)


def prompt_length(method) -> int:
    """The test prompt, longer for a fixed structure whose own budget holds the usual one whole."""
    own = getattr(method, "budget_label", None)
    return N_PROMPT if not isinstance(own, int) or own < N_PROMPT else 2 * own


def run(model, method, question: list[int] | None = None):
    """Chunked prefill, then greedy decode, traced; returns (cache, tokens, logits, context)."""
    cache = SieveCache(model, method, trace=True)
    context = random_ids(prompt_length(method))
    tokens, logits = greedy_with_logits(model, cache, context, N_NEW, question=question, chunk_size=CHUNK)
    return cache, tokens, logits, context


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("name", NAMES)
def test_a_covering_budget_is_the_full_cache(model, name):
    ids = torch.tensor([random_ids(N_PROMPT)])
    kw = dict(max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    expected = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    cache = SieveCache(model, build(name, COVERING_BUDGET))
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), expected)
    assert cache.stored_tokens() == [N_PROMPT + N_NEW - 1] * len(cache.sieve_layers)  # nothing dropped


@pytest.mark.parametrize("name", NAMES)
def test_under_a_budget_equals_the_full_cache_replay(model, name):
    method = build(name, REAL_BUDGET)
    question = random_ids(6, seed=7) if replay_kind(method) == MASKED else None
    cache, tokens, logits, context = run(model, method, question)
    traces = traces_of(cache)
    if name != "full":
        attended = [t.shape[-1] for layer in traces.values() for t in layer[-N_NEW + 1 :]]
        assert min(attended) < len(context), f"{name} attends everything: nothing is tested"
    if replay_kind(method) == MASKED:
        reference = masked_reference(model, traces, context, tokens, question=question, chunk_size=CHUNK)
    else:
        reference = infllm_reference(model, traces, context, tokens, method.n_local, method.exc_block_size, CHUNK)
    diff = (logits - reference).abs().max().item()
    assert diff < LOGIT_TOL, f"{name}: max |dlogit| = {diff:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_same_parameters_same_run_and_a_seed_changes_the_random_part(model, name):
    first, tokens_a, _, _ = run(model, build(name, REAL_BUDGET))
    second, tokens_b, _, _ = run(model, build(name, REAL_BUDGET))
    assert tokens_a == tokens_b
    for a, b in zip(traces_of(first).values(), traces_of(second).values()):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    if "seed" in INFOS[name].params:
        other, _, _, _ = run(model, build(name, REAL_BUDGET, seed=INFOS[name].params["seed"] + 1))
        kept = [layer.policy.store.positions for layer in first.sieve_layers]
        kept_other = [layer.policy.store.positions for layer in other.sieve_layers]
        assert any(not torch.equal(x, y) for x, y in zip(kept, kept_other)), f"{name}: the seed changes nothing"


@pytest.mark.parametrize("name", NAMES)
def test_a_model_called_with_autograd_on_runs_as_under_inference_mode(model, name):
    """Called outside no_grad / inference_mode (as a user may): the same tokens and logits as under inference mode;
    the cache's stores, written in place, keep no autograd history."""
    method = build(name, REAL_BUDGET)
    context = random_ids(prompt_length(method))
    expected, expected_logits = greedy_with_logits(model, SieveCache(model, method), context, N_NEW, chunk_size=CHUNK)
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    run_with_grad = greedy_with_logits.__wrapped__  # the same loop without its inference_mode
    tokens, logits = run_with_grad(model, SieveCache(model, method), context, N_NEW, chunk_size=CHUNK)
    assert tokens == expected and (logits - expected_logits).abs().max().item() < LOGIT_TOL


def _bad_values(value) -> list:
    """Values no parameter of this type may take: the wrong type, and out-of-range numbers."""
    if isinstance(value, bool):
        return ["yes", 1]
    if isinstance(value, str):
        return ["no-such-choice", 3]
    if isinstance(value, int):
        return ["many", -1]
    if isinstance(value, float):
        return ["much", -1.5]
    return ["bad"]  # None-defaulted and other parameters: a string is never one of their values


@pytest.mark.parametrize("name", NAMES)
def test_every_bad_parameter_is_refused_in_one_line_naming_it(name):
    info = INFOS[name]
    for param, default in info.params.items():
        for bad in _bad_values(default):
            with pytest.raises((TypeError, ValueError)) as refused:
                kvsieve.method(name, **{param: bad})
            message = str(refused.value)
            assert param in message and "\n" not in message, f"{name}.{param}={bad!r}: {message!r}"
    with pytest.raises(ValueError, match=r"no parameter 'budgett'|takes no parameters"):
        kvsieve.method(name, budgett=1)
    for field in dataclasses.fields(type(kvsieve.method(name))):
        assert field.name in info.param_help, f"{name}.{field.name} has no help text"
