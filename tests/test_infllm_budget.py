"""Budget-first InfLLM and ActQKV: the budget (entries a decode step attends per layer) derives every structural
parameter left unset, parameters that were set are honoured or refused at construction, and no decode step attends
more than the budget -- measured from the positions each step attended (the traces), never from the arithmetic.

* At 2048 the derivation is ActQKV's released Llama-3 structure, field by field; ``infllm-2k`` and ``actqkv-2k``
  are that derivation; without a budget the released configurations stay.
* Every budget from the minimum (32) up derives a structure that fills it exactly; below the minimum a budget is
  refused; a fraction that resolves below it on a short prompt resolves to it.
* On prompts of 50, 300 and 3,000 tokens (tiny random-init models) a fraction of the prompt runs and every decode
  step stays within the resolved budget; ``budget=2048`` on a 3,000-token prompt attends at most 2048 per step
  where the released structure without a budget attends up to one block more.
* User-set parameters: kept (``block_size=16`` at 410), refused with their names (``n_local=4096, budget=2048``),
  ActQKV's floor above what the budget allows refused, the sweeps' explicit structures unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import kvsieve
from helpers import IdTokenizer, greedy_with_logits, random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.methods.actqkv import BlockPool
from kvsieve.methods.infllm import InfLLM
from kvsieve.methods.infllm_budget import MIN_BUDGET

SWEEPS = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps"
BLOCK_METHODS = ("infllm", "actqkv")
# ActQKV's released Llama-3 configuration (spec/methods.md 2.5), written out here as the spec gives it
RELEASED_LLAMA3_2K = dict(
    n_init=64, n_local=512, block_size=32, topk=46, exc_block_size=256, repr_topk=4, max_cached_block=128
)


def structure(method) -> dict[str, int]:
    return {name: getattr(method, name) for name in InfLLM.STRUCTURE}


def decode_attended(cache: SieveCache, steps: int) -> list[list[int]]:
    """Per decode step, the entries each layer attended (from the traces: the last ``steps`` calls)."""
    per_layer = [[t.shape[-1] for t in layer.meter.trace[-steps:]] for layer in cache.sieve_layers]
    return [list(step) for step in zip(*per_layer)]


def step_size(name: str, per_layer: list[int]) -> float:
    """What a step's budget bounds: each layer for InfLLM, the mean over layers for ActQKV."""
    return max(per_layer) if name == "infllm" else sum(per_layer) / len(per_layer)


# ---------------------------------------------------------------------------------------- the derivation
def test_the_budget_of_2048_derives_the_released_structure():
    for name in BLOCK_METHODS:
        derived = kvsieve.method(name, budget=2048)
        assert structure(derived) == RELEASED_LLAMA3_2K and derived.given == frozenset(), name
    actqkv = kvsieve.method("actqkv", budget=2048)
    assert (actqkv.min_blocks, actqkv.max_blocks_per_step) == (32, 92)  # the released clamp
    released = kvsieve.method("actqkv-llama3-2k")  # the released config, without a budget
    assert structure(released) == RELEASED_LLAMA3_2K and released.budget is None
    assert (released.min_blocks, released.max_blocks_per_step) == (32, 92)
    # the 2K presets are the derivation at 2048, written once
    by_name = {info.name: info for info in kvsieve.methods()}
    for preset, name in (("infllm-2k", "infllm"), ("actqkv-2k", "actqkv")):
        assert by_name[preset].preset_params == {"budget": 2048}
        assert kvsieve.method(preset).params() == kvsieve.method(name, budget=2048).params()


def test_without_a_budget_the_released_configurations_stay():
    infllm, actqkv = kvsieve.method("infllm"), kvsieve.method("actqkv")
    assert structure(infllm) == dict(
        n_init=128, n_local=4096, block_size=128, topk=16, exc_block_size=512, repr_topk=4, max_cached_block=None
    )
    assert infllm.cache_blocks == 32 and infllm.budget_label == 128 + 4096 + 16 * 128
    assert structure(actqkv) == {**RELEASED_LLAMA3_2K, "max_cached_block": None}
    assert (actqkv.min_blocks, actqkv.max_blocks_per_step, actqkv.cache_blocks) == (32, 92, 184)
    qwen = kvsieve.method("actqkv-qwen25-2k")
    assert (qwen.block_size, qwen.topk, qwen.min_blocks, qwen.max_blocks_per_step) == (64, 23, 32, 46)


def test_every_budget_from_the_minimum_derives_a_structure_that_fills_it():
    for budget in [*range(MIN_BUDGET, 3000), 4096, 8192, 32768, 131072]:
        for name in BLOCK_METHODS:
            m = kvsieve.method(name, budget=budget)
            assert m.n_init + m.n_local + m.topk * m.block_size == budget, (name, budget)
            assert m.block_size & (m.block_size - 1) == 0 and m.block_size**2 <= budget < (2 * m.block_size) ** 2
            assert m.topk >= 1 and m.block_size <= m.n_local and 1 <= m.exc_block_size <= min(512, m.n_local)
            assert 1 <= m.repr_topk <= m.block_size and m.cache_blocks >= 2 * m.topk
            if name == "actqkv":
                assert 1 <= m.min_blocks <= m.topk <= m.max_blocks_per_step <= m.cache_blocks
    for bad in (MIN_BUDGET - 1, 0, True, 2048.0 * 2):
        with pytest.raises((ValueError, TypeError), match="budget"):
            kvsieve.method("infllm", budget=bad)


def test_help_says_what_is_derived():
    for info in kvsieve.methods():
        if info.name not in BLOCK_METHODS:
            continue
        for name in InfLLM.STRUCTURE:
            assert info.params[name] is None and "derived from budget when unset" in info.param_help[name], name
        assert "strict_budget" in info.budget_counts and str(MIN_BUDGET) in info.budget_counts


# ------------------------------------------------------------------------------------------ measured
def test_budget_2048_on_a_3000_token_prompt_attends_the_released_structure_or_at_most_2048_when_strict():
    """As released, a step attends the structure's 2048 entries plus the partial block outside its window and its
    own token (2049-2080: the released preset, without a budget, the same); with ``strict_budget`` every decode step
    attends at most 2048 entries, and uses them (46 blocks each step)."""
    model = tiny_model("llama")
    ids, steps = random_ids(3000, seed=2), 40
    for name in BLOCK_METHODS:
        for strict in (False, True):
            cache = SieveCache(model, kvsieve.method(name, budget=2048, strict_budget=strict), trace=True)
            greedy_with_logits(model, cache, ids, steps + 1)
            per_step = [step_size(name, layers) for layers in decode_attended(cache, steps)]
            if strict:
                assert max(per_step) == 2048 and min(per_step) > 2048 - 32, (name, per_step)
            else:
                assert min(per_step) > 2048 and max(per_step) <= 2048 + 32, (name, per_step)
            assert cache.sieve_layers[0].policy.stats()["retrieved_blocks_decode_min"] == 46
    released = SieveCache(model, kvsieve.method("actqkv-llama3-2k"), trace=True)
    greedy_with_logits(model, released, ids, steps + 1)
    unbounded = [step_size("actqkv", layers) for layers in decode_attended(released, steps)]
    assert 2048 < max(unbounded) <= 2048 + 32
    strict = kvsieve.method("infllm", budget=2048, strict_budget=True)
    out = kvsieve.generate(model, IdTokenizer(), ids, method=strict, max_new_tokens=8)
    assert out.stats.budget == 2048 and out.stats.attended_per_step <= 2048
    with pytest.raises(ValueError, match="strict_budget=True needs a budget"):
        kvsieve.method("infllm", strict_budget=True)


@pytest.mark.parametrize("name", BLOCK_METHODS)
@pytest.mark.parametrize("n_prompt", [20, 50, 300, 3000])
def test_a_fraction_of_the_prompt_runs_on_every_length_within_its_budget(name, n_prompt):
    """``budget=0.2`` resolves to 20% of the prompt, at least 32 entries (20 tokens: the whole prompt), and every
    decode step attends at most that (``strict_budget``; as released, up to a partial block more)."""
    model = tiny_model("qwen2")
    method = kvsieve.method(name, budget=0.2, strict_budget=True)
    resolved = method.for_prompt(n_prompt)
    assert resolved.budget == max(MIN_BUDGET, round(0.2 * n_prompt)) and resolved.name == name
    ids, steps = random_ids(n_prompt, seed=n_prompt), 12
    cache = SieveCache(model, resolved, trace=True)
    greedy_with_logits(model, cache, ids, steps + 1)
    for step, layers in enumerate(decode_attended(cache, steps)):
        seen = n_prompt + step + 1
        assert step_size(name, layers) <= min(resolved.budget, seen), (step, layers)
    if n_prompt >= 300:
        assert cache.sieve_layers[0].policy.stats()["host_blocks"] > resolved.topk  # retrieval really chose
    out = kvsieve.generate(model, IdTokenizer(), ids, method=method, max_new_tokens=4)
    assert out.stats.budget == resolved.budget and out.stats.attended_per_step <= resolved.budget


# ------------------------------------------------------------------------------- what the user set
def test_set_parameters_are_honoured_or_refused_by_name():
    blocks16 = kvsieve.method("infllm", budget=410, block_size=16)
    assert blocks16.block_size == 16 and blocks16.given == {"block_size"}
    assert blocks16.n_init + blocks16.n_local + blocks16.topk * 16 == 410
    again = blocks16.with_budget(2048)  # what was set stays, the rest is derived anew
    assert again.block_size == 16 and (again.n_init, again.n_local, again.topk) == (64, 512, 92)
    forty = kvsieve.method("infllm", budget=2048, topk=40)  # the window takes the rest
    assert (forty.topk, forty.n_local) == (40, 2048 - 64 - 40 * 32)
    refused = {
        "n_local=4096 cannot fit budget=2048": dict(n_local=4096, budget=2048),
        "n_init=100, n_local=1000, block_size=32, topk=40 cannot fit budget=2048": dict(
            n_init=100, n_local=1000, block_size=32, topk=40, budget=2048
        ),
        "block_size must be <= n_local": dict(block_size=64, n_local=32, budget=2048),
        r"repr_topk must be in \[1, 32\]": dict(repr_topk=64, budget=2048),
        r"exc_block_size must be in \[1, 512\]": dict(exc_block_size=1024, budget=2048),
        r"max_cached_block must be in \[46, inf\]": dict(max_cached_block=10, budget=2048),
        r"budget must be an int >= 32": dict(budget=31),
    }
    for message, params in refused.items():
        with pytest.raises(ValueError, match=message):
            kvsieve.method("infllm", **params)
    fraction = kvsieve.method("infllm", budget=0.2, n_local=4096)  # a fraction: checked when it is resolved
    with pytest.raises(ValueError, match=r"budget=0.2 of a 1000-token prompt is 200 entries: n_local=4096 cannot"):
        fraction.for_prompt(1000)
    assert fraction.for_prompt(25_000).n_local == 4096


def test_an_actqkv_floor_above_what_the_budget_allows_is_refused():
    with pytest.raises(ValueError, match=r"min_blocks=32 exceeds the 18 blocks per layer \(topk\) that budget=410"):
        kvsieve.method("actqkv", budget=410, min_blocks=32)
    with pytest.raises(ValueError, match=r"200 entries: min_blocks=30 exceeds the 18 blocks .* budget=200"):
        kvsieve.method("actqkv", budget=0.2, min_blocks=30).for_prompt(1000)
    assert kvsieve.method("actqkv", budget=410, min_blocks=18).min_blocks == 18
    with pytest.raises(ValueError, match=r"min_blocks=32 exceeds the device cache of 16 blocks"):
        kvsieve.method("actqkv", topk=4, max_cached_block=16)


def test_a_floor_above_max_blocks_gets_a_cache_that_holds_it():
    """Without a budget the released floor (32) may exceed ``2 x topk`` (the Qwen2.5 config does): the default
    device cache holds twice the floor, so generation does not fail when a step takes the floor (it used to hold
    twice ``max_blocks``, 8 blocks here, and generation failed at the first step that needed more)."""
    model = tiny_model("llama")
    method = kvsieve.method("actqkv", n_init=4, n_local=16, block_size=4, topk=2, exc_block_size=8, min_blocks=12)
    assert method.max_blocks_per_step == 4 and method.cache_blocks == 24
    cache = SieveCache(model, method)
    greedy_with_logits(model, cache, random_ids(200), 4, chunk_size=50)
    assert cache.sieve_layers[0].policy.stats()["retrieved_blocks_decode_min"] == 12


def test_with_strict_budget_the_pool_never_hands_out_more_than_topk_per_layer():
    """The released rule lets an early layer take up to ``max_blocks`` and the later ones their floors, overdrawing
    the pool; with ``strict_budget`` (``within_pool``) a layer leaves the later layers their floors."""
    entropies = [0.9, 0.01, 0.01]

    def split(within_pool: bool) -> list[int]:
        pool = BlockPool(topk=10, min_blocks=8, max_blocks=20, window=1, within_pool=within_pool)
        for _ in entropies:
            pool.add_layer()
        for _ in range(2):  # the first round fills the entropy windows (uniform), the second is dynamic
            pool.reset(1)
            counts = [pool.take(layer, 0, e, 100, dynamic=True) for layer, e in enumerate(entropies)]
        return counts

    assert split(False) == [20, 8, 8]  # 36 > 30: over budget
    assert split(True) == [14, 8, 8]  # 30: within it


def test_the_sweeps_explicit_structures_are_unchanged():
    """The judge sweeps set the structure themselves (scaled by hand before budgets derived it): still accepted,
    the same structure at every length they run."""
    expected = {
        ("judge_2k_blocks", "infllm"): (16, 128, 16, 16, 128, 4, None),
        ("judge_2k_blocks", "actqkv"): (16, 128, 16, 16, 128, 4, 1),
        ("judge_8k_blocks", "infllm"): (64, 512, 32, 46, 256, 4, None),
        ("judge_8k_blocks", "actqkv"): (64, 512, 32, 46, 256, 4, 32),
    }
    for (sweep, name), want in expected.items():
        config = yaml.safe_load((SWEEPS / f"{sweep}.yaml").read_text())
        for budget in config["budgets"]:
            for length in config["lengths"]:
                built = kvsieve.method(name, **config["params"][name], budget=budget).for_prompt(length - 48)
                got = (built.n_init, built.n_local, built.block_size, built.topk, built.exc_block_size)
                assert (*got, built.repr_topk, getattr(built, "min_blocks", None)) == want, (sweep, name)


def test_a_budget_cache_attends_no_more_than_the_budget_after_a_question():
    """Query-agnostic use: the question fed after the compressed context, then decoding; within the budget."""
    model = tiny_model("llama")
    ctx, question, steps = random_ids(400), random_ids(9, seed=7), 10
    for name in BLOCK_METHODS:
        cache = SieveCache(model, kvsieve.method(name, budget=64, strict_budget=True), trace=True)
        greedy_with_logits(model, cache, ctx, steps + 1, question=question)
        assert all(step_size(name, layers) <= 64 for layers in decode_attended(cache, steps))
        assert torch.is_tensor(cache.sieve_layers[0].meter.trace[-1])
