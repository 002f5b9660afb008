"""Padded batches and decoding strategies, for every registered method (`kvsieve.methods()`).

* A left-padded batch through ``model.generate`` with a `SieveCache`: each row's greedy tokens and the positions
  it attended in every layer and call equal that prompt run alone, whatever the other rows' lengths; its logits
  equal the alone run's within ``LOGIT_TOL`` (fp32: batch matmuls of other shapes round differently).
* Beam search and several returned sequences (sampled) at a budget that evicts nothing give exactly the tokens of
  transformers' own uncompressed cache: the rows are reordered and repeated with their method state.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import random_ids, tiny_model
from kvsieve.cache import SieveCache
from test_conformance import COVERING_BUDGET, NAMES, REAL_BUDGET, build, prompt_length

LOGIT_TOL = 1e-4
LENGTHS = (1.0, 0.7, 0.45)  # the rows' prompt lengths, as fractions of the method's test prompt
N_NEW = 5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3_text"])
def arch_model(request):
    return request.param, tiny_model(request.param)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, longest]``, each prompt at the right end of its row."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def generate(model, method, ids, mask, **kwargs):
    """``model.generate`` with a traced `SieveCache`: (new tokens ``[B, n]``, scores ``[B, n, V]``, cache)."""
    cache = SieveCache(model, method, trace=True)
    out = model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=N_NEW,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, dim=1), cache


def assert_row_equals_alone(batch_cache, row: int, alone_cache) -> None:
    """Row ``row`` of ``batch_cache`` attended, in every layer and call, exactly what ``alone_cache`` did."""
    for index, (b, a) in enumerate(zip(batch_cache.sieve_layers, alone_cache.sieve_layers)):
        ours, theirs = b.rows[row].meter.trace, a.meter.trace
        assert len(ours) == len(theirs), f"layer {index}: {len(ours)} attention calls, alone {len(theirs)}"
        for call, (x, y) in enumerate(zip(ours, theirs)):
            assert torch.equal(x, y), f"layer {index}, call {call}: attended positions differ from the prompt alone"
        assert b.rows[row].meter.stored_after_prefill == a.meter.stored_after_prefill, f"layer {index}"
        assert b.rows[row].seen == a.seen, f"layer {index}: padding counted as tokens"


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_rows_equal_each_prompt_alone(arch_model, name):
    arch, model = arch_model
    method = build(name, REAL_BUDGET)
    n = prompt_length(method)
    prompts = [random_ids(int(n * f), seed=row + 1) for row, f in enumerate(LENGTHS)]
    tokens, scores, cache = generate(model, method, *left_padded(prompts))
    assert cache.batch_size == len(prompts)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_scores, alone = generate(model, method, *left_padded([prompt]))
        assert tokens[row].tolist() == alone_tokens[0].tolist(), f"{arch} row {row}: tokens differ from alone"
        assert_row_equals_alone(cache, row, alone)
        assert (scores[row] - alone_scores[0]).abs().max().item() < LOGIT_TOL


@pytest.mark.parametrize("name", ["snapkv", "nacl", "pyramidkv"])
def test_a_fractional_budget_is_a_fraction_of_each_rows_own_prompt(name):
    """Padding never counts toward a row's budget: rows of different lengths keep different numbers of entries."""
    model = tiny_model("llama")
    method = build(name, 0.25)
    prompts = [random_ids(96, seed=1), random_ids(48, seed=2)]
    _, _, cache = generate(model, method, *left_padded(prompts))
    for row, prompt in enumerate(prompts):
        _, _, alone = generate(model, method, *left_padded([prompt]))
        assert [layer.rows[row].meter.stored_after_prefill for layer in cache.sieve_layers] == [
            layer.meter.stored_after_prefill for layer in alone.sieve_layers
        ]
    stored = [sum(layer.rows[row].meter.stored_after_prefill for layer in cache.sieve_layers) for row in range(2)]
    assert stored[0] > stored[1]


STRATEGIES = {
    "beams": dict(num_beams=3, num_return_sequences=2),
    "sampled": dict(do_sample=True, num_return_sequences=2, top_k=0),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", NAMES)
def test_beams_and_several_sequences_equal_the_uncompressed_cache(name, strategy):
    """At a budget that evicts nothing, beam search (rows reordered and copied every step) and several sampled
    sequences per prompt (rows repeated) give exactly the uncompressed cache's tokens, on a padded batch."""
    model = tiny_model("llama")
    ids, mask = left_padded([random_ids(40, seed=1), random_ids(27, seed=2)])
    kwargs = dict(STRATEGIES[strategy], max_new_tokens=6, pad_token_id=0, attention_mask=mask)

    def run(cache):
        torch.manual_seed(0)
        with torch.inference_mode():
            return model.generate(ids, past_key_values=cache, **kwargs)

    expected = run(DynamicCache(config=model.config))
    assert torch.equal(run(SieveCache(model, build(name, COVERING_BUDGET))), expected)


def test_reordered_rows_are_independent_copies():
    """A row taken twice by ``reorder_cache`` is two method states: feeding one does not change the other."""
    model = tiny_model("llama")
    cache = SieveCache(model, build("h2o", 16))
    with torch.inference_mode():
        model(input_ids=torch.tensor([random_ids(30, seed=1), random_ids(30, seed=2)]), past_key_values=cache)
        cache.reorder_cache(torch.tensor([1, 1]))
        layer = cache.sieve_layers[0]
        assert layer.rows[0].policy is not layer.rows[1].policy
        assert torch.equal(layer.rows[0].policy.store.positions, layer.rows[1].policy.store.positions)
        model(input_ids=torch.tensor([[5], [6]]), past_key_values=cache)
    assert not torch.equal(layer.rows[0].policy.store.keys, layer.rows[1].policy.store.keys)
    with pytest.raises(IndexError, match="reorder_cache: row 2 out of range for a batch of 2"):
        cache.reorder_cache(torch.tensor([0, 2]))
