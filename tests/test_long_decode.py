"""benchmarks/long_decode.py at toy size: every method against the full cache and its floor, resumable."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark, tiny_llama_for

long_decode = load_benchmark("long_decode")


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_llama_for(smollm2_tokenizer, 4096), smollm2_tokenizer


def test_rows_for_every_method_with_floor_and_resume(tiny, tmp_path, capsys):
    model, tok = tiny
    args = long_decode.parse_args(
        ["--lengths", "300", "--budget", "64", "--new-tokens", "4", "--repeats", "2", "--chunk-size", "128",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = long_decode.run(model, tok, args)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["full", *long_decode.DEFAULT_METHODS.split(",")]  # shared prefill first, then their own
    assert by["full"]["speedup_over_full"] == 1.0 and by["full"]["attended_per_step"] == 302.0
    # SnapKV keeps 64 entries: its 3 steps attend 65, 66, 67, as the full cache's on a 64-token prompt
    assert by["snapkv"]["attended_per_step"] == 66.0 and by["snapkv"]["floor_tokens"] == 64
    for r in rows:
        assert len(r["decode_ms_all"]) == 2 and r["decode_ms"] > 0 and r["prefill_s"] > 0
        if r["method"] not in ("full", "refreshkv", "infllm", "actqkv"):  # these keep more than they attend
            assert r["kv_bytes"] < by["full"]["kv_bytes"]
    assert all(r["floor_ratio"] is not None for r in rows)
    assert "| 300 | snapkv |" in long_decode.table(rows)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == list(by)
    # a rerun skips the length already measured and appends nothing
    again = long_decode.run(model, tok, args)
    assert (tmp_path / "rows.jsonl").read_text().splitlines() == lines and len(again) == len(rows)
    assert "already in" in capsys.readouterr().out
