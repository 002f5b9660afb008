"""benchmarks/attn_step.py on a tiny model: run specs parse into methods with their parameters, the interleaved
rounds give every run each slot of the order in turn, and the timers return one time per run and repetition."""

from __future__ import annotations

import pytest

import kvsieve
from helpers import load_benchmark, random_ids, tiny_model

attn_step = load_benchmark("attn_step")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_a_run_spec_is_a_method_with_its_parameters_and_prompt_length():
    method, n = attn_step.parse_run("infllm-2k:offload=true:topk=40@16384", 4096)
    assert (method.offload, method.topk, method.budget, n) == (True, 40, 2048, 16384)
    method, n = attn_step.parse_run("full", 4096)
    assert method.name == "full" and n == 4096
    with pytest.raises(TypeError, match="offload must be True, False or None"):
        attn_step.parse_run("infllm:offload=maybe", 10)


def test_rounds_rotate_the_order():
    assert list(attn_step.rounds(3, 3)) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0), (2, 2), (2, 0), (2, 1)]


def test_interleaved_prefills_and_steps_time_every_run():
    model = tiny_model("llama")
    small = dict(n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8, repr_topk=2)
    methods = [kvsieve.method("full")] + [kvsieve.method("infllm", **small, offload=o) for o in (False, True)]
    prompts = [random_ids(60, seed=s) for s in range(3)]
    prefills = attn_step.interleaved_prefills(model, prompts, methods, repeats=2)
    assert [len(t) for t in prefills] == [2, 2, 2] and all(s > 0 for t in prefills for s in t)
    spent: list[float] = []
    steps = attn_step.interleaved_times(model, prompts, methods, 4, spent)
    assert [len(t) for t in steps] == [4, 4, 4] and all(step >= attn >= 0 for t in steps for step, attn in t)
    line = attn_step.ratio_line("full", [1.0, 2.0], [1.0, 1.0], "step ms", 1e3)
    assert "median 1500.00" in line and "x first median 1.500 min 1.000 max 2.000" in line
