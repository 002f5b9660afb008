"""The generation loop: sampling, seeds, streaming, stopping, chunked prefill and statistics."""

from __future__ import annotations

import torch

import kvsieve
from helpers import IdTokenizer, random_ids, tiny_model
from kvsieve.generate import sample_next


def test_sampling_is_greedy_at_zero_temperature_and_seeded_otherwise():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_next(logits, 0.0, 1.0, None).item() == 1
    draws = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}  # temperature 1 reaches every token
    again = [sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(200)]
    assert draws == again
    # top_p keeps the smallest set whose mass reaches p: here the two near-equal best tokens
    nucleus = {sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert nucleus == {1, 3}


def test_seeded_generation_repeats_and_differs_across_seeds():
    model = tiny_model("llama")
    prompt = random_ids(30)
    run = [
        kvsieve.generate(model, IdTokenizer(), prompt, "snapkv", max_new_tokens=12, temperature=1.0, seed=s).tokens
        for s in (1, 1, 2)
    ]
    assert run[0] == run[1]
    assert run[0] != run[2]


def test_stream_pieces_make_the_text_and_eos_stops():
    model = tiny_model("llama")
    prompt = random_ids(30)
    pieces: list[str] = []
    out = kvsieve.generate(model, IdTokenizer(), prompt, max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == out.text and len(out.tokens) == 10
    stop = out.tokens[3]
    first = out.tokens.index(stop)
    stopped = kvsieve.generate(model, IdTokenizer(eos=stop), prompt, max_new_tokens=10)
    assert stopped.tokens == out.tokens[: first + 1]


def test_chunked_prefill_gives_the_same_tokens_and_statistics():
    model = tiny_model("qwen2")
    prompt = random_ids(50)
    whole = kvsieve.generate(model, IdTokenizer(), prompt, kvsieve.method("h2o", budget=20), max_new_tokens=8)
    chunked = kvsieve.generate(
        model, IdTokenizer(), prompt, kvsieve.method("h2o", budget=20), max_new_tokens=8, chunk_size=16
    )
    assert chunked.tokens == whole.tokens
    assert chunked.stats.kv_stored_tokens_per_layer == whole.stats.kv_stored_tokens_per_layer == [20, 20, 20]
    assert chunked.stats.prompt_tokens == 50 and chunked.stats.new_tokens == 8
    assert chunked.stats.decode_s_per_token > 0 and chunked.stats.prefill_s > 0
    # a rolling method attends budget + the new token at every decode step
    assert chunked.stats.attended_per_step == 21
