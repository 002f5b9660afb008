"""The arithmetic of benchmarks/kvpress_crosscheck.py on constructed indices (no model, no kvpress venv).

The cross-check itself runs kvpress in its own virtualenv (/work/venvs/kvpress); only the one test that starts
that venv's python is skipped where it is absent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark

KVPRESS_PYTHON = Path("/work/venvs/kvpress/bin/python")


crosscheck = load_benchmark("kvpress_crosscheck")
worker = load_benchmark("kvpress_worker")


def test_overlap_is_the_shared_fraction_of_the_larger_set():
    assert crosscheck.overlap([1, 2, 3, 4], [4, 3, 2, 1]) == 1.0
    assert crosscheck.overlap([1, 2, 3, 4], [1, 2, 3, 5]) == 0.75
    assert crosscheck.overlap([1, 2, 3], [1, 2, 3, 4]) == 0.75  # one side keeps one more: not 100%
    assert crosscheck.overlap([], []) == 1.0


def test_compare_kept_over_layers_and_heads():
    a = [[[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3], [4, 5, 6, 7]]]
    b = [[[3, 2, 1, 0], [0, 1, 2, 9]], [[0, 1, 8, 9], [4, 5, 6, 7]]]
    result = crosscheck.compare_kept(a, b)
    assert result["pairs"] == 4
    assert result["identical_pairs"] == 2
    assert result["min"] == 0.5
    assert result["mean"] == pytest.approx((1 + 0.75 + 0.5 + 1) / 4)
    assert result["per_layer_mean"] == pytest.approx([0.875, 0.75])
    with pytest.raises(ValueError, match="layers or KV heads"):
        crosscheck.compare_kept(a, b[:1])


def test_differences_are_classified_by_region_and_side():
    n, window_starts, margin = 100, [36, 68], 2  # windows of 64 and 32 tokens, kernel 5
    a = [[[0, 1, 40, 50, 67]]]  # 67: just before the 32-token window; 40, 50: kept as window by the other side
    b = [[[0, 1, 34, 20, 21]]]  # 34: just before the 64-token window
    counts = crosscheck.classify_differences(a, b, n, window_starts, margin)
    assert counts["start"] == {"a_only": 0, "b_only": 0}
    assert counts["window_edge"] == {"a_only": 1, "b_only": 1}
    assert counts["between_windows"] == {"a_only": 2, "b_only": 0}
    assert counts["interior"] == {"a_only": 0, "b_only": 2}
    assert crosscheck.classify_differences([[[0, 5]]], [[[1, 5]]], 10, [], 0)["interior"] == {"a_only": 1, "b_only": 1}


def test_kvpress_budget_truncates_where_kvsieve_rounds():
    from kvsieve.methods.base import resolve_budget

    assert crosscheck.n_kept_kvpress(2048, 1 - 0.2) == 409  # 2048 * 0.19999999999999996, truncated
    assert resolve_budget(0.2, 2048) == 410  # kvsieve: round(409.6)
    assert crosscheck.n_kept_kvpress(2000, 1 - 0.5) == resolve_budget(0.5, 2000) == 1000
    assert crosscheck.n_kept_kvpress(3, 0.9) == 1


def test_match_positions_recovers_the_gathered_rows_in_any_order():
    torch.manual_seed(0)
    original = torch.randn(2, 50, 8)
    index = torch.tensor([[7, 3, 49, 0, 12], [1, 2, 30, 31, 5]])
    kept = original.gather(1, index.unsqueeze(-1).expand(-1, -1, 8))
    assert worker.match_positions(original, kept) == [[0, 3, 7, 12, 49], [1, 2, 5, 30, 31]]
    with pytest.raises(ValueError, match="not bitwise equal"):
        worker.match_positions(original, kept + 1e-3)
    with pytest.raises(ValueError, match="same uncompressed key"):
        worker.match_positions(original, kept[:, [0, 0, 1]])


def test_timing_ratios_are_paired_within_a_repetition():
    side = {"prefill_s": 2.0, "decode_s_per_token": 0.1, "kv_bytes": 2**20}
    entry = {"cell": "snapkv", "budget": 0.2, "kvsieve": side, "kvpress": side,
             "paired": {"prefill_s": [0.9, 1.0, 1.3], "decode_s_per_token": [1.1, 0.95, 1.0]}}  # fmt: skip
    row = crosscheck.timing_table([entry]).splitlines()[-1]
    # the median of the pairs with their range, not the ratio of the medians (1.00 here)
    assert "| 1.00 (0.90-1.30) |" in row and "| 1.00 (0.95-1.10) |" in row and row.endswith("| 3 |")
    entry["paired"]["prefill_s"] = [1.2, 1.4, 1.3]
    assert "| 1.30 (1.20-1.40) |" in crosscheck.timing_table([entry])


@pytest.mark.skipif(not KVPRESS_PYTHON.exists(), reason="the kvpress venv (/work/venvs/kvpress) is absent")
def test_the_worker_imports_in_the_kvpress_venv():
    code = "import kvpress, transformers; print(transformers.__version__)"
    done = subprocess.run([str(KVPRESS_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert tuple(int(x) for x in done.stdout.strip().split(".")[:2]) < (5, 3)
