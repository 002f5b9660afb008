"""benchmarks/decode_pieces.py on a tiny model: the count of blocks copied into the attended buffer, and its bytes."""

from __future__ import annotations

import pytest

import kvsieve
from helpers import load_benchmark, random_ids, tiny_model
from kvsieve.driver import Driver

decode_pieces = load_benchmark("decode_pieces")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_block_copies_count_every_layers_copies_and_one_blocks_bytes():
    model = tiny_model("llama")
    small = dict(n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8, repr_topk=2, offload=False)
    driver = Driver.new(model, kvsieve.method("infllm", **small), 60, reserve=8)
    logits = driver.prefill(random_ids(60))
    before, block_bytes = decode_pieces.block_copies(driver)
    for _ in range(4):
        logits = driver.step(int(logits[0].argmax()))
    after, _ = decode_pieces.block_copies(driver)
    memories = [layer.policy.memory for layer in driver.cache.sieve_layers]
    assert after == sum(m.buffer.copies for m in memories) and after >= before > 0
    h_kv, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert block_bytes == 2 * h_kv * 4 * d * 4  # K and V of one row's block: H_kv x block_size x D float32
    full = Driver.new(model, kvsieve.method("full"), 60, reserve=8)
    full.prefill(random_ids(60))
    assert decode_pieces.block_copies(full) is None
