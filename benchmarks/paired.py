"""Paired differences between two methods of one run directory, prompt by prompt (or document by document).

The report gives each method's mean score with its interval; a claim "A beats B" needs the paired difference, since
prompts differ far more from each other than methods do on one prompt.

* Scored tasks (passkey, niah, ...): on how many prompts both, neither, only A or only B answer (score 1 vs 0), and
  the exact McNemar p-value (two-sided binomial test on the prompts only one of them answers).
* ``lm`` rows: the mean difference of NLL (nats per scored token), KL and top-1 agreement, its 95% interval (Student
  t over documents) and on how many documents A is better.

    .venv/bin/python benchmarks/paired.py docs/results/judge_lm_4k \\
        --pairs refreshkv:snapkv-w1,refreshkv:h2o,refreshkv-qc5:snapkv-w1
    .venv/bin/python benchmarks/paired.py docs/results/judge_8k_blocks --pairs actqkv:infllm

A method name matches its rows at every budget; name one budget as ``name@budget`` (``snapkv@0.2``) when the run
has several.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

from kvsieve.eval.runner import run_rows

LM_METRICS = (("nll", "lower"), ("kl", "lower"), ("top1_agreement", "higher"))


def load(run_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """``{task: {pair key: [ok rows]}}`` of every rows file of the run (shards included)."""
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in run_rows(run_dir):
        if row.get("status") == "ok":
            by_task[row["task"]][row["pair"]].append(row)
    return by_task


def pick(rows: list[dict], name: str) -> dict | None:
    """The row of method ``name`` (``method`` or ``method@budget``) among one prompt's rows."""
    method, _, budget = name.partition("@")
    found = [r for r in rows if r["method"] == method and (not budget or r["budget"] == budget)]
    if len(found) > 1:
        budgets = sorted(r["budget"] for r in found)
        raise SystemExit(f"--pairs: {method!r} has rows at budgets {budgets}; name one as {method}@BUDGET")
    return found[0] if found else None


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def lm_line(a: str, b: str, pairs: list[tuple[dict, dict]]) -> str:
    cells = []
    for metric, better in LM_METRICS:
        diffs = [ra[metric] - rb[metric] for ra, rb in pairs]
        mean, lo, hi = interval(diffs)
        cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        if metric != "top1_agreement":
            wins = sum(x < 0 for x in diffs) if better == "lower" else sum(x > 0 for x in diffs)
            cells.append(f"{wins}/{len(pairs)}")
    return f"| `{a}` - `{b}` | {len(pairs)} | " + " | ".join(cells) + " |"


def scored_line(task: str, a: str, b: str, pairs: list[tuple[dict, dict]]) -> str:
    right = [(ra["score"] >= 1.0, rb["score"] >= 1.0) for ra, rb in pairs]
    both = sum(x and y for x, y in right)
    neither = sum(not x and not y for x, y in right)
    only_a = sum(x and not y for x, y in right)
    only_b = sum(y and not x for x, y in right)
    discordant = only_a + only_b
    p = stats.binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return f"| {task} | `{a}` vs `{b}` | {len(pairs)} | {both} | {neither} | {only_a} | {only_b} | {p:.3f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pairs", required=True, help="comma-separated A:B pairs of method names")
    args = parser.parse_args(argv)
    by_task = load(args.run_dir)
    lm, scored = [], []
    for pair in args.pairs.split(","):
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"--pairs: {pair!r} is not A:B")
        matched = False
        for task, prompts in sorted(by_task.items()):
            pairs = [(pick(rows, a), pick(rows, b)) for _, rows in sorted(prompts.items())]
            pairs = [(ra, rb) for ra, rb in pairs if ra is not None and rb is not None]
            if not pairs:
                continue
            matched = True
            (lm if task == "lm" else scored).append((task, a, b, pairs))
        if not matched:
            raise SystemExit(f"--pairs: no prompt has both {a!r} and {b!r}")
    if scored:
        print("| task | A vs B | prompts | both | neither | only A | only B | McNemar p (exact) |")
        print("|---|---|---|---|---|---|---|---|")
        for task, a, b, pairs in scored:
            print(scored_line(task, a, b, pairs))
    if lm:
        print("| A - B | documents | mean dNLL [95%] | A better | mean dKL [95%] | A better | mean dtop-1 [95%] |")
        print("|---|---|---|---|---|---|---|")
        for _, a, b, pairs in lm:
            print(lm_line(a, b, pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
