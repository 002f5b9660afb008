"""benchmarks/op_counts.py on a tiny model: the ops a decode step dispatches, counted; StreamingLLM's ring
dispatches no priority and no argmin, the generic rolling eviction one of each per layer and step."""

from __future__ import annotations

import pytest

from helpers import load_benchmark, random_ids, tiny_model
from kvsieve.methods.streamingllm import StreamingLLMPolicy

op_counts = load_benchmark("op_counts")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_the_ring_removes_the_argmin_and_the_priority_from_every_step(monkeypatch):
    model = tiny_model("llama")
    layers, steps = model.config.num_hidden_layers, 5
    ids = random_ids(60)
    full = op_counts.count(model, ids, "full", steps)
    ringed = op_counts.count(model, ids, "streamingllm", steps)
    monkeypatch.setattr(StreamingLLMPolicy, "_ring_start", lambda self: None)
    generic = op_counts.count(model, ids, "streamingllm", steps)
    assert full["aten::linear"] == ringed["aten::linear"] == generic["aten::linear"] > 0  # the same model work
    forwards = steps - 1  # the first token is the prefill's
    assert "aten::argmin" not in ringed and generic["aten::argmin"] == layers * forwards  # every step's eviction
    assert "aten::where" not in ringed and generic["aten::where"] >= layers * forwards  # the priority
    assert sum(full.values()) < sum(ringed.values()) < sum(generic.values())
