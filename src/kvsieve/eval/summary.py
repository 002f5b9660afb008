"""A run's summary: per task, mode, method and budget, the mean score with its 95% interval, retention against
the full cache, KV memory and latency (`summarize`); the terminal table (`format_summary`); and the run
directory's ``summary.json`` (`write_summary`), rewritten after every unit (``complete: true`` once every unit's
rows exist)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvsieve.budget import label_order
from kvsieve.eval.config import FULL, LM_TASK
from kvsieve.eval.rundir import SUMMARY, elapsed_by_writer, write_atomic
from kvsieve.eval.stats import format_interval, wilson_interval

__all__ = ["format_summary", "skip_notes", "summarize", "write_summary"]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, mode, method and budget: rows, mean score, retention (method score / full-cache score over the
    same samples and questions), mean KV bytes, prefill seconds and decode ms per token (LM: perplexity and KL).

    Every mean score comes with its count and 95% Wilson interval (`wilson_interval`, summed scores as successes):
    ``n``, ``score_lo``, ``score_hi``, and ``full_n``, ``full_score``, ``full_score_lo``, ``full_score_hi`` for the
    full cache over the pairs that retention compares. ``None`` where there is nothing to score."""

    def interval(total: float, n: int) -> tuple[float | None, float | None]:
        return wilson_interval(total, n) if n else (None, None)

    full_scores = {
        r["pair"]: r["score"] for r in rows if r["method"] == FULL and r.get("status") == "ok" and "pair" in r
    }
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["mode"], row["method"], row["budget"]), []).append(row)
    method_order = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for (task, mode, method, budget), members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        paired = [r for r in ok if r.get("pair") in full_scores]
        full_sum = sum(full_scores[r["pair"]] for r in paired)
        score_sum = sum(r["score"] for r in ok)
        score_lo, score_hi = interval(score_sum, len(ok))
        full_lo, full_hi = interval(full_sum, len(paired))
        entry = {
            "task": task,
            "mode": mode,
            "method": method,
            "budget": budget,
            "n": len(ok),
            "skipped": len(members) - len(ok),
            "skip_reasons": _reasons(members),
            "score": score_sum / len(ok) if ok else None,
            "score_lo": score_lo,
            "score_hi": score_hi,
            "retention": sum(r["score"] for r in paired) / full_sum if paired and full_sum > 0 else None,
            "full_n": len(paired),
            "full_score": full_sum / len(paired) if paired else None,
            "full_score_lo": full_lo,
            "full_score_hi": full_hi,
            "kv_bytes": _mean(r.get("kv_bytes") for r in ok),
            "kv_bytes_full": _mean(r.get("kv_bytes_full") for r in ok),
            "kv_stored_tokens": _mean(r.get("kv_stored_tokens") for r in ok),
            "prefill_s": _mean(r.get("prefill_s") for r in ok),
            "decode_ms_per_token": _mean(
                None if r.get("decode_s_per_token") is None else 1000 * r["decode_s_per_token"] for r in ok
            ),
        }
        if task == LM_TASK:
            entry["ppl"] = _mean(r.get("ppl") for r in ok)
            entry["kl"] = _mean(r.get("kl") for r in ok)
        out.append(entry)
    out.sort(
        key=lambda g: (
            g["task"],
            g["mode"],
            method_order.index(g["method"]) if g["method"] in method_order else 0,
            label_order(g["budget"]),
        )
    )
    return out


def _reasons(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Why rows were skipped: each distinct reason with its count."""
    reasons: dict[str, int] = {}
    for row in rows:
        if row.get("status") == "skipped":
            reason = row.get("reason") or "no reason recorded"
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def skip_notes(groups: Sequence[dict[str, Any]]) -> list[str]:
    """One line per distinct skip reason: how many rows, of which tasks and methods."""
    where: dict[str, tuple[int, dict[str, None], dict[str, None]]] = {}
    for g in groups:
        for reason, count in (g.get("skip_reasons") or {}).items():
            total, tasks, methods = where.get(reason, (0, {}, {}))
            tasks[g["task"]] = None
            methods[g["method"]] = None
            where[reason] = (total + count, tasks, methods)
    return [
        f"{total} rows skipped ({', '.join(tasks)}; {', '.join(methods)}): {reason}"
        for reason, (total, tasks, methods) in where.items()
    ]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


# The columns of a summary table, in the terminal (`format_summary`) and on the report page.
SUMMARY_COLUMNS = (
    "task",
    "mode",
    "method",
    "budget",
    "n",
    "score",
    "95% CI",
    "retention",
    "KV MiB",
    "prefill s",
    "decode ms/tok",
)


def format_summary(groups: Sequence[dict[str, Any]]) -> str:
    """The terminal table: one line per task, mode, method and budget."""
    has_lm = any(g["task"] == LM_TASK for g in groups)
    header = list(SUMMARY_COLUMNS)
    if has_lm:
        header += ["ppl", "KL"]
    lines = [header]
    for g in groups:
        line = [
            g["task"],
            g["mode"],
            g["method"],
            g["budget"],
            str(g["n"]) + (f" (+{g['skipped']} skipped)" if g["skipped"] else ""),
            _fmt(g["score"], ".3f"),
            format_interval(g["score_lo"], g["score_hi"], 3),
            _fmt(g["retention"], ".3f"),
            _fmt(None if g["kv_bytes"] is None else g["kv_bytes"] / 2**20, ".2f"),
            _fmt(g["prefill_s"], ".2f"),
            _fmt(g["decode_ms_per_token"], ".1f"),
        ]
        if has_lm:
            line += [_fmt(g.get("ppl"), ".2f"), _fmt(g.get("kl"), ".4f")]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = []
    for n, line in enumerate(lines):
        cells = [str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        text.append("  ".join(cells).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    text += [f"note: {line}" for line in skip_notes(groups)]
    return "\n".join(text)


def write_summary(out: Path, rows: list[dict[str, Any]], complete: bool) -> list[dict]:
    """Rewrite ``summary.json`` of the run directory ``out`` from ``rows``; returns the summary groups."""
    groups = summarize(rows)
    elapsed = elapsed_by_writer(out)
    summary = {
        "complete": complete,
        "rows": len(rows),
        "ok": sum(r.get("status") == "ok" for r in rows),
        "skipped": sum(r.get("status") == "skipped" for r in rows),
        "elapsed_s": sum(elapsed.values()) if elapsed else None,
        "elapsed_s_by_writer": elapsed,
        "groups": groups,
    }
    write_atomic(out / SUMMARY, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return groups
