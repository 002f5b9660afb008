"""`kvsieve bench`: measured rows for every method and length, ratios to the full cache, skips beyond the window,
clear errors. Timings themselves are never asserted (they live in benchmarks and docs)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_llama_for
from kvsieve.bench import BenchRow, bench, bench_runs, floor_length, format_bench, prompt_ids
from kvsieve.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

WINDOW = 512


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_llama_for(smollm2_tokenizer, WINDOW), smollm2_tokenizer


def test_prompt_is_public_domain_text_of_the_exact_length(smollm2_tokenizer):
    ids = prompt_ids(smollm2_tokenizer, 300)
    assert len(ids) == 300 and ids == prompt_ids(smollm2_tokenizer, 600)[:300]
    assert smollm2_tokenizer.decode(ids[:6]).lstrip().startswith("In the beginning God created")
    many = prompt_ids(smollm2_tokenizer, 600_000)  # longer than the texts: repeated, still exact
    assert len(many) == 600_000 and many[:300] == ids


def test_rows_measure_every_method_and_compare_with_full(tiny):
    model, tok = tiny
    rows = bench(model, tok, ["snapkv", "streamingllm"], [128], budgets=[0.25, 1.0], new_tokens=4, repeats=2)
    by = {(r.method, r.budget): r for r in rows}
    assert list(by) == [("full", "-"), ("snapkv", "0.25"), ("snapkv", "1.0"), ("streamingllm", "0.25"),
                        ("streamingllm", "1.0")]  # fmt: skip
    full = by["full", "-"]
    assert full.prefill_ratio == 1.0 and full.decode_ratio == 1.0 and full.same_prefix_as_ref == 4
    for row in rows:
        assert row.status == "ok" and row.repeats == 2 and len(row.prefill_s_all) == 2 and len(row.decode_ms_all) == 2
        assert row.prefill_s > 0 and row.decode_ms_per_token > 0 and row.kv_bytes_full == full.kv_bytes
    # a budget of the whole prompt evicts nothing: same tokens and bytes as the full cache
    assert by["snapkv", "1.0"].same_prefix_as_ref == 4 and by["snapkv", "1.0"].kv_bytes == full.kv_bytes
    # a quarter of the prompt: a quarter of the bytes (32 of 128 entries per layer and head), measured
    assert by["snapkv", "0.25"].kv_bytes * 4 == full.kv_bytes
    assert by["streamingllm", "0.25"].kv_bytes_end == by["streamingllm", "0.25"].kv_bytes  # rolling window
    # 4 tokens: the first from the prefill, then 3 decode steps attending 32 kept + 1, 2, 3 new entries
    assert by["snapkv", "0.25"].attended_per_step == 34.0
    assert "snapkv" in format_bench(rows)


def test_floor_is_the_full_cache_at_the_attended_size(tiny):
    model, tok = tiny
    # the full cache at n tokens attends n + new_tokens / 2 per decode step (steps 1..new_tokens - 1 attend n + t)
    assert floor_length(34.0, 4) == 32 and floor_length(116.0, 32) == 100 and floor_length(None, 4) is None
    assert floor_length(40.0, 1) is None  # nothing decoded
    rows = bench(model, tok, ["snapkv", "streamingllm"], [128], budgets=[32], new_tokens=4, repeats=2, floor=True,
                 warmup=False)  # fmt: skip
    by = {r.method: r for r in rows}
    full, snap = by["full"], by["snapkv"]
    # SnapKV at 32 keeps 32 entries: its steps attend 34 on average, as the full cache on a 32-token prompt; the
    # rolling window attends its budget at every step (33 on average here: a floor of 31 tokens)
    assert snap.floor_tokens == 32 and full.floor_tokens == 128
    streaming = by["streamingllm"]
    assert streaming.floor_tokens == floor_length(streaming.attended_per_step, 4) < 32
    assert snap.floor_decode_ms > 0 and snap.floor_ratio > 0
    assert "x floor" in format_bench(rows)
    without = bench(model, tok, ["snapkv"], [128], budgets=[32], new_tokens=4, repeats=1, warmup=False)
    assert all(r.floor_ratio is None and r.floor_tokens is None for r in without)


def test_methods_that_cannot_extrapolate_are_skipped_beyond_the_window(tiny):
    model, tok = tiny
    params = {"infllm": dict(n_init=4, n_local=64, block_size=8, exc_block_size=32)}
    rows = bench(model, tok, ["infllm"], [WINDOW], budgets=[4 + 64 + 2 * 8], params=params, new_tokens=2, repeats=1)
    full, infllm = rows
    assert full.status == "skipped" and "window of 512" in full.reason and full.prefill_s is None
    assert infllm.status == "ok" and infllm.host_bytes > 0 and infllm.prefill_ratio is None
    assert "skipped" in format_bench(rows)
    # beyond the window the ratios compare with another method: its first budget
    rows = bench(model, tok, ["infllm"], [WINDOW], budgets=[84, 92], params=params, new_tokens=2, repeats=2,
                 reference="infllm")  # fmt: skip
    _, two, three = rows
    assert two.reference == three.reference == "infllm 84" and two.prefill_ratio == 1.0 and three.prefill_ratio > 0
    assert two.same_prefix_as_ref == 2 and three.attended_per_step > two.attended_per_step  # 3 blocks against 2
    with pytest.raises(ValueError, match="reference 'snapkv' is not among"):
        bench(model, tok, ["infllm"], [64], budgets=[84], params=params, reference="snapkv")


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="new_tokens"):
        bench_runs(["snapkv"], [128], new_tokens=0)
    with pytest.raises(ValueError, match="repeats"):
        bench_runs(["snapkv"], [128], repeats=0)
    with pytest.raises(ValueError, match="Did you mean 'snapkv'"):
        bench_runs(["snapvk"], [128])
    with pytest.raises(ValueError, match="lengths"):
        bench_runs(["snapkv"], [8])
    with pytest.raises(ValueError, match="reference 'h2o' is not among"):
        bench_runs(["snapkv"], [128], reference="h2o")


def test_command_line_writes_json(tiny, tmp_path, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tmp_path / "m"), "--methods", "h2o", "--budgets", "16", "--lengths", "64",
            "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["rows"]] == ["full", "h2o"] and record["env"]["torch"] == torch.__version__
    assert record["rows"][1]["kv_bytes"] * 4 == record["rows"][0]["kv_bytes"]
    captured = capsys.readouterr()
    assert "h2o" in captured.out and "1 repetition: no spread is measured" in captured.err
    assert main(["bench", "--methods", "h2o", "--new-tokens", "0"]) == 2  # fails before loading any model
    # --json is a flag, as for generate and methods: the record on standard output instead of the table
    assert main([*args[:-2], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in printed["rows"]] == ["full", "h2o"] and printed["warnings"]
    # the old `--json FILE` says where the file goes now, before loading any model
    assert main(["bench", "--methods", "h2o", "--json", str(out)]) == 2
    assert f"--json is a flag (JSON on standard output); write a file with --out {out}" in capsys.readouterr().err


def test_progress_bar_with_time_left(tiny, capsys):
    model, tok = tiny
    bench(model, tok, ["snapkv"], [64], budgets=[16], new_tokens=2, repeats=2, warmup=False, progress=True)
    err = capsys.readouterr().err
    assert "kvsieve bench" in err and "4/4" in err and "<" in err  # 2 methods x 2 repeats; tqdm's elapsed<left


def _row(method: str, budget: str, decode: list[float], prefill: list[float]) -> BenchRow:
    return BenchRow(method, budget, 4096, 32, len(decode), prefill_s_all=prefill, decode_ms_all=decode,
                    reference="full -")  # fmt: skip


def test_repetitions_that_disagree_more_than_the_difference_are_flagged():
    from kvsieve.bench import noise_warnings

    stable = [_row("full", "-", [2285.0, 2290.0, 2280.0], [1.0, 1.0, 1.0]),
              _row("snapkv", "0.2", [342.0, 345.0, 340.0], [1.1, 1.1, 1.1])]  # fmt: skip
    assert noise_warnings(stable) == []
    noisy_ref = [_row("full", "-", [300.0, 2285.0, 2400.0], [1.0, 1.0, 1.0]),
                 _row("snapkv", "0.2", [342.0, 345.0, 340.0], [1.0, 1.0, 1.0])]  # fmt: skip
    (warning,) = noise_warnings(noisy_ref)
    assert warning.startswith("snapkv 0.2 at 4096 tokens: decode differs from full by 1.94e+03 ms/token")
    assert "less than the 2.1e+03 ms/token spread of full's repetitions" in warning
