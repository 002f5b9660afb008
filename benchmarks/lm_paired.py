"""Paired differences between methods on an ``lm`` run directory, per document, with 95% t-intervals.

The report gives each method's mean perplexity and KL to the full cache; a claim "A beats B" needs the per-document
difference, since documents differ far more from each other than methods do on one document. For each pair of
methods this prints the mean difference of NLL (nats per scored token), KL and top-1 agreement, its 95% interval
(Student t over documents) and on how many documents A is better.

    .venv/bin/python benchmarks/lm_paired.py docs/results/judge_lm_4k \\
        --pairs refreshkv:snapkv-w1,refreshkv:h2o,refreshkv-qc5:snapkv-w1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

METRICS = (("nll", "lower"), ("kl", "lower"), ("top1_agreement", "higher"))


def load(run_dir: Path) -> dict[str, dict[str, dict]]:
    """``{sample_id: {method: row}}`` of the run's ok ``lm`` rows."""
    by_doc: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in (run_dir / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("task") == "lm" and row.get("status") == "ok":
            by_doc[row["sample_id"]][row["method"]] = row
    return by_doc


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pairs", required=True, help="comma-separated A:B pairs of method names")
    args = parser.parse_args(argv)
    by_doc = load(args.run_dir)
    print("| A - B | documents | mean dNLL [95%] | A better | mean dKL [95%] | A better | mean dtop-1 [95%] |")
    print("|---|---|---|---|---|---|---|")
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        docs = [d for d, rows in sorted(by_doc.items()) if a in rows and b in rows]
        if not docs:
            raise SystemExit(f"--pairs: no document has both {a!r} and {b!r}")
        cells = []
        for metric, better in METRICS:
            diffs = [by_doc[d][a][metric] - by_doc[d][b][metric] for d in docs]
            mean, lo, hi = interval(diffs)
            cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            if metric != "top1_agreement":
                wins = sum(x < 0 for x in diffs) if better == "lower" else sum(x > 0 for x in diffs)
                cells.append(f"{wins}/{len(docs)}")
        print(f"| `{a}` - `{b}` | {len(docs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
