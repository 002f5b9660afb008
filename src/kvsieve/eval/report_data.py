"""The data of a report: run directories read back (`load_run`), their rows merged into series (`merge_runs`) and
summarized per series (`series_groups`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvsieve.eval.rundir import CONFIG, ENV, SUMMARY, rows_files, run_rows
from kvsieve.eval.summary import summarize

__all__ = ["RunData", "group_by", "load_run", "merge_runs", "series_groups"]


@dataclass
class RunData:
    """One run directory, read back."""

    name: str
    path: Path
    config: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    if not rows_files(path):
        raise FileNotFoundError(f"{str(path)!r} is not a kvsieve run directory (no rows.jsonl)")

    def read(name: str, parse: Callable[[str], Any]) -> Any:
        try:
            return parse((path / name).read_text(encoding="utf-8")) or {}
        except (OSError, ValueError, yaml.YAMLError):
            return {}

    return RunData(
        path.resolve().name,
        path,
        read(CONFIG, yaml.safe_load),
        read(ENV, json.loads),
        read(SUMMARY, json.loads),
        run_rows(path),
    )


def merge_runs(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Every run's rows, each with its ``series`` (the name plotted) and ``_run``.

    Runs of one model and dtype are one sweep split in parts: a row whose key and parameters appeared in an earlier
    run is the same computation (the full-cache reference of every part) and is kept once, and a method keeps its
    plain name unless it ran with different parameters in different runs (then ``method [run]``). Runs of
    different models are never merged: every series is ``method [run]``.
    """
    one_model = len({(run.config.get("model"), run.config.get("dtype")) for run in runs}) == 1
    variants: dict[str, set[str]] = {}  # per method, its parameter sets apart from the budget (a sweep axis)
    for run in runs:
        for row in run.rows:
            params = {k: v for k, v in (row.get("params") or {}).items() if k != "budget"}
            variants.setdefault(row["method"], set()).add(json.dumps(params, sort_keys=True))
    merged, seen = [], set()
    for run in runs:
        for row in run.rows:
            params = json.dumps(row.get("params") or {}, sort_keys=True)
            if one_model and (row["key"], params) in seen:
                continue
            seen.add((row["key"], params))
            plain = len(runs) == 1 or (one_model and len(variants[row["method"]]) == 1)
            merged.append(
                {**row, "_run": run.name, "series": row["method"] if plain else f"{row['method']} [{run.name}]"}
            )
    return merged


def series_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`summarize` over merged rows, per series (``method`` is the series name, ``method_key`` the method)."""
    method_of = {r["series"]: r["method"] for r in rows}
    return [
        {**g, "series": g["method"], "method_key": method_of[g["method"]]}
        for g in summarize([{**r, "method": r["series"]} for r in rows])
    ]


def group_by(items, key) -> dict[Any, list]:
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out
