"""RefreshKV's decode fast paths against plain references, and its decode benchmark at toy size."""

from __future__ import annotations

import pytest
import torch

from helpers import load_benchmark, tiny_llama_for
from kvsieve.methods.eviction import PROTECTED
from kvsieve.methods.refreshkv import rank_keys, select_top, top_in_slot_order

bench = load_benchmark("bench_refreshkv_decode")


def _worst_reference(scores: list[float], positions: list[int]) -> int:
    """Index of the entry to evict: the lowest score, ties to the newer position (the documented order)."""
    return min(range(len(scores)), key=lambda i: (scores[i], -positions[i]))


def test_rank_keys_argmin_evicts_as_the_score_position_order():
    """Rolling evictions by ``argmin`` of the rank keys equal the reference order on tied scores (max-pooling
    copies peaks), with generated tokens keyed PROTECTED + position, through 40 evictions."""
    gen = torch.Generator().manual_seed(0)
    s, k = 64, 24
    scores = torch.randint(0, 6, (2, 3, s), generator=gen).float() / 8  # many ties
    positions = torch.stack([torch.randperm(s, generator=gen) for _ in range(6)]).view(2, 3, s).int()
    slots, rank = select_top(scores, positions, k)
    keys = rank_keys(rank)
    for b in range(2):
        for h in range(3):
            sc = scores[b, h, slots[b, h]].tolist()
            pos = positions[b, h, slots[b, h]].tolist()
            key = keys[b, h].tolist()
            order = sorted(range(k), key=lambda i: (-sc[i], pos[i]))  # best first
            assert [rank[b, h, i].item() for i in order] == list(range(k))
            for step in range(40):  # append a generated token, evict the worst, as a partial step does
                position = s + step
                sc.append(PROTECTED + position)
                pos.append(position)
                key.append(PROTECTED + position)
                worst = int(torch.tensor(key, dtype=torch.float64).argmin())
                assert worst == _worst_reference(sc, pos)
                for column in (sc, pos, key):  # the store moves the last entry into the evicted slot
                    column[worst] = column[-1]
                    column.pop()


def test_select_top_of_everything_keeps_the_stored_order():
    scores = torch.tensor([[[0.5, 0.5, 0.9, 0.1]]])
    slots, rank = select_top(scores, torch.arange(4).view(1, 1, 4), 4)
    assert slots.tolist() == [[[0, 1, 2, 3]]] and rank.tolist() == [[[1, 2, 0, 3]]]


def test_benchmark_rows_split_partial_and_full_steps(smollm2_tokenizer, capsys):
    model, tok = tiny_llama_for(smollm2_tokenizer, 4096), smollm2_tokenizer
    args = bench.parse_args(["--context", "200", "--budget", "32", "--new-tokens", "6", "--stride", "2"])
    ids = bench.prompt_ids(tok, args.context, None)[0]
    rows = bench.run(model, tok, ids, args)
    by = {r["method"]: r for r in rows}
    assert list(by) == bench.DEFAULT_METHODS
    assert by["floor"]["prompt_tokens"] == 30  # its 5 steps attend 31..35 entries: K + 1 = 33 on average
    assert by["floor"]["attended_per_step"] == 33.0 and by["floor"]["vs_floor"] == 1.0
    assert by["partial-only"]["full_fraction"] == 0.0 and by["partial-only"]["attended_per_step"] == 33.0
    assert by["full-only"]["full_fraction"] == 1.0
    assert by["full-only"]["same_prefix_as_full"] == 6  # every step full: the full cache's tokens
    assert by["refreshkv-fixed"]["full_fraction"] == pytest.approx(2 / 5)  # steps 2 and 4 of 5
    f = by["refreshkv-fixed"]["full_fraction"]
    predicted = (1 - f) * by["partial-only"]["decode_ms_per_token"] + f * by["full-only"]["decode_ms_per_token"]
    assert by["refreshkv-fixed"]["predicted_ms"] == pytest.approx(predicted)
    spread = by["refreshkv"]["decode_ms_spread"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    bench.print_table(rows, "toy")
    assert "partial-only" in capsys.readouterr().out


def test_top_in_slot_order_equals_select_top_on_ordered_positions():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (2, 3, 50), generator=gen).float()
    positions = torch.arange(50, dtype=torch.int32).expand(2, 3, 50)
    for k in (1, 17, 50):
        expected = select_top(scores, positions, k)
        got = top_in_slot_order(scores, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
