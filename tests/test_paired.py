"""benchmarks/paired.py on a constructed run directory: paired counts, the exact McNemar p-value, shards read."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark

paired = load_benchmark("paired")


def _row(prompt: int, method: str, score: float, budget: str = "64") -> dict:
    pair = f"passkey|L512|p{prompt}|q0|query_aware"
    key = f"{pair}|{method}|{budget}"
    return {"key": key, "pair": pair, "task": "passkey", "method": method, "budget": budget, "score": score,
            "status": "ok"}  # fmt: skip


def test_paired_counts_and_exact_mcnemar_over_every_shard(tmp_path, capsys):
    # A and B on 12 prompts: 5 both, 2 neither, 4 A only, 1 B only; half the prompts in each shard's file
    outcomes = [(1, 1)] * 5 + [(0, 0)] * 2 + [(1, 0)] * 4 + [(0, 1)]
    for shard in (0, 1):
        rows = [r for p, (a, b) in enumerate(outcomes) if p % 2 == shard for r in (_row(p, "a", a), _row(p, "b", b))]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / f"rows.shard-{shard}-of-2.jsonl").write_text(text)
    assert paired.main([str(tmp_path), "--pairs", "a:b"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    # two-sided exact binomial on the 5 discordant prompts, 4 vs 1: 2 x (1 + 5) / 32 = 0.375
    assert line == "| passkey | `a` vs `b` | 12 | 5 | 2 | 4 | 1 | 0.375 |"


def test_a_method_at_several_budgets_must_be_named_with_one(tmp_path):
    rows = [_row(0, "a", 1, "64"), _row(0, "a", 0, "128"), _row(0, "b", 1)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="name one as a@BUDGET"):
        paired.main([str(tmp_path), "--pairs", "a:b"])
    assert paired.main([str(tmp_path), "--pairs", "a@128:b"]) == 0
