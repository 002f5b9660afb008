"""Every registered method whose budget counts stored entries stores what its budget means (issue 13).

Driven by `kvsieve.methods()`: every method and preset is measured here, or `NOT_STORED` says why not, so a new
method is covered the day it is registered. Measured from the layers' stores and meters on a tiny random-init model,
never from the method's own arithmetic:

* after the prompt each layer stores ``min(budget, n)`` entries per KV head (int budgets and fractions, prompts
  shorter and longer than the budget); under a non-uniform schedule (PyramidKV) each layer stores the pyramid's
  share and the mean over layers is the budget;
* rolling methods (StreamingLLM, H2O) never hold more than their budget during decoding; one-shot methods append;
* the entries a rolling method's decode step attends are its budget plus the step's own token. Methods whose budget
  counts entries attended per step are measured by the same check once listed in `ATTENDED`.
"""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods.base import resolve_budget
from kvsieve.methods.schedules import pyramid_budgets

# Methods (by the method a preset configures) measured elsewhere, and why. A new method whose budget does not count
# stored entries must be listed here with its reason, or the registry test below fails.
NOT_STORED = {
    "full": "no budget: it keeps and attends every token",
    "infllm": "its budget counts the entries a decode step attends (init + window + blocks, plus the block still "
    "filling as released): measured in tests/test_infllm_budget.py, with and without strict_budget",
    "actqkv": "as infllm, on average over layers: measured in tests/test_infllm_budget.py",
    "refreshkv": "its budget counts the entries a partial decode step attends (K); the full cache is stored too",
}
# Methods whose budget counts the entries a decode step attends, measured by `test_decode_steps_attend_the_budget`
# (the rolling methods, whose stored budget is also what a step attends, are measured there as well).
ATTENDED: list[str] = ["refreshkv"]

BUDGETS = (16, 64, 0.1, 0.25)
PROMPTS = (48, 700)  # shorter and longer than the int budgets
N_STEPS = 6

REGISTERED = {info.name: info for info in kvsieve.methods()}
STORED = sorted(name for name, info in REGISTERED.items() if (info.preset_of or name) not in NOT_STORED)
ROLLING = sorted(name for name in STORED if REGISTERED[name].params.get("rolling") is True)


def test_every_registered_method_is_measured_or_says_why():
    for name, info in REGISTERED.items():
        base = info.preset_of or name
        if base in NOT_STORED:
            continue
        assert info.budget_counts.startswith("entries stored"), (
            f"{name}: its budget counts {info.budget_counts!r}; measure it here or list {base!r} in NOT_STORED "
            "with the reason"
        )
        assert "budget" in info.params, f"{name} says its budget counts stored entries but has no budget parameter"
    bases = {info.preset_of or name for name, info in REGISTERED.items()}
    assert set(NOT_STORED) <= bases, f"NOT_STORED lists methods that are not registered: {set(NOT_STORED) - bases}"
    assert {"snapkv", "pyramidkv", "h2o", "streamingllm", "nacl"} <= set(STORED)
    assert {"h2o", "streamingllm"} <= set(ROLLING)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@torch.inference_mode()
def run(model, method, n: int, n_steps: int = N_STEPS):
    """Prompt of ``n`` tokens, then ``n_steps`` greedy decode steps. Returns the cache, the entries per KV head each
    layer stored after the prompt and after each step (measured from the stores), and what each step attended."""
    cache = SieveCache(model, method.for_prompt(n))
    layers = cache.sieve_layers
    logits = Driver(model, cache).prompt(random_ids(n))
    after_prompt = [layer.policy.store.length for layer in layers]
    assert after_prompt == [layer.meter.stored_after_prefill for layer in layers]
    assert all(layer.policy.store.keys.shape[2] == s for layer, s in zip(layers, after_prompt))  # real tensors
    stored_per_step, attended_per_step = [], []
    for _ in range(n_steps):
        marks = [layer.meter.mark() for layer in layers]
        token = torch.tensor([[int(logits.argmax(-1))]])
        logits = model(input_ids=token, **cache_kwargs(model, cache)).logits[:, -1]
        stored_per_step.append([layer.policy.store.length for layer in layers])
        attended_per_step.append([layer.meter.attended_since(mark) for layer, mark in zip(layers, marks)])
    return cache, after_prompt, stored_per_step, attended_per_step


def layer_caps(method, n: int, n_layers: int) -> list[int]:
    """What the budget means for each layer after a prompt of ``n`` tokens: the budget everywhere, or under the
    pyramid schedule (PyramidKV) each layer's share, by KVCache-Factory's formula (`pyramid_budgets`)."""
    k = resolve_budget(method.budget, n)
    schedule = getattr(method, "layer_schedule", "uniform")
    if schedule == "uniform" or k >= n:
        return [k] * n_layers
    assert schedule == "pyramid", f"{method.name}: no expectation written for layer_schedule={schedule!r}"
    pyramid = method.pyramid()
    return pyramid_budgets(k, n, n_layers, pyramid.window, pyramid.beta)


@pytest.mark.parametrize("name", STORED)
def test_stored_entries_after_the_prompt_are_the_budget(model, name):
    for budget in BUDGETS:
        for n in PROMPTS:
            method = kvsieve.method(name, budget=budget)
            _, stored, per_step, _ = run(model, method, n)
            k = min(resolve_budget(budget, n), n)
            expected = [min(cap, n) for cap in layer_caps(method, n, len(stored))]
            assert stored == expected, f"{name} budget={budget} n={n}: stored {stored}, expected {expected}"
            assert sum(stored) == k * len(stored), f"{name} budget={budget} n={n}: the mean over layers is not {k}"
            if name not in ROLLING:  # one-shot: every later token is appended, never evicted
                assert per_step == [[s + step for s in stored] for step in range(1, N_STEPS + 1)], (name, budget, n)


@pytest.mark.parametrize("name", ROLLING)
def test_rolling_methods_never_exceed_the_budget_while_decoding(model, name):
    for budget in BUDGETS:
        for n in (16, 48, 700):  # n = 16: the cache fills up to the budget during decoding, then holds it
            method = kvsieve.method(name, budget=budget)
            _, stored, per_step, _ = run(model, method, n, n_steps=12)
            caps = layer_caps(method, n, len(stored))
            for step, sizes in enumerate(per_step, start=1):
                expected = [min(cap, n + step) for cap in caps]
                assert sizes == expected, f"{name} budget={budget} n={n} step {step}: {sizes} != {expected}"


@pytest.mark.parametrize("name", ROLLING + ATTENDED)
def test_decode_steps_attend_the_budget(model, name):
    """A decode step attends, per layer and KV head, the budget's entries plus its own token (the fewest over the
    steps: RefreshKV's full steps and InfLLM's growing window attend more on other steps)."""
    for budget in (16, 0.1):
        method = kvsieve.method(name, budget=budget)
        _, _, _, attended = run(model, method, 700)
        k = resolve_budget(budget, 700)
        fewest = [min(step[layer] for step in attended) for layer in range(len(attended[0]))]
        assert fewest == [k + 1] * len(fewest), (name, budget, fewest)
