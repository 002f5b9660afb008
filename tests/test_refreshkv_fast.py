"""RefreshKV's decode fast paths against plain references, and its decode benchmark at toy size."""

from __future__ import annotations

import pytest

from helpers import load_benchmark, tiny_llama_for

bench = load_benchmark("bench_refreshkv_decode")


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
