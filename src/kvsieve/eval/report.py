"""``kvsieve report``: one self-contained HTML page from one or more run directories.

The page holds, per task, score and retention (score / full-cache score) against the budget for every method and
mode; needle-in-a-haystack heatmaps (needle depth x prompt length) per method and budget; KV memory and latency
per method, budget and length; for the ``lm`` task perplexity, KL to the full cache and top-1 agreement; and under
every plot the table of the numbers drawn. Every mean score has its count and 95% Wilson interval beside it (error
bars in the plots, a band around the full cache's line), so that one sample in five is not read as a result.
Plots are matplotlib PNGs inlined as base64: the file needs nothing else (no scripts or styles from the network),
so it can be mailed or committed as is. A few lines of inline script only report an image that failed to decode
on the browser console (the test looks for console errors).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvsieve.budget import FULL_LABEL, label_order
from kvsieve.eval.config import FULL, LM_TASK
from kvsieve.eval.report_data import RunData, load_run, merge_runs, series_groups
from kvsieve.eval.report_sections import (
    colors_for,
    cost_section,
    heatmap_section,
    html_table,
    interval_text,
    number_text,
    score_section,
)
from kvsieve.eval.summary import SUMMARY_COLUMNS, skip_notes

__all__ = ["RunData", "build_report", "load_run", "summary_markdown", "write_report"]


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1400px;
       color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.5em; }
img.plot { max-width: 100%; display: block; margin: 12px 0; }
table.numbers { border-collapse: collapse; font-size: 12px; margin: 8px 0 24px; }
table.numbers td, table.numbers th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.numbers th { background: #f3f3f3; } table.numbers td.t { text-align: left; }
table.meta td { padding: 1px 12px 1px 0; font-size: 13px; vertical-align: top; }
.note { color: #555; font-size: 13px; }
"""

# Reports an image that did not decode; a healthy report logs nothing.
_SCRIPT = """
window.addEventListener("load", function () {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) { console.error("kvsieve report: image failed: " + img.alt); }
  }
});
"""


def _meta_section(runs: Sequence[RunData]) -> str:
    parts = []
    for run in runs:
        env, config, summary = run.env, run.config, run.summary
        model = env.get("model") or {}
        cells = [
            ("run", str(run.path)),
            (
                "model",
                f"{config.get('model')} ({model.get('type', '?')}, {model.get('parameters', '?')} parameters, "
                f"{model.get('dtype', '?')}, window {model.get('max_position_embeddings', '?')})",
            ),
            ("methods", ", ".join(config.get("methods") or [])),
            ("budgets", ", ".join(map(str, config.get("budgets") or []))),
            ("tasks", ", ".join(config.get("tasks") or []) + (" + data files" if config.get("data") else "")),
            ("lengths", ", ".join(map(str, config.get("lengths") or []))),
            (
                "samples",
                f"{config.get('samples')} per task, length and depth; modes {', '.join(config.get('modes') or [])}",
            ),
            (
                "rows",
                f"{sum(r.get('status') == 'ok' for r in run.rows)} ok, "
                f"{sum(r.get('status') == 'skipped' for r in run.rows)} skipped"
                + ("" if summary.get("complete") else " (run not complete)"),
            ),
            ("time", "-" if summary.get("elapsed_s") is None else f"{summary['elapsed_s'] / 60:.1f} min"),
            (
                "software",
                f"python {env.get('python', '?')}, torch {env.get('torch', '?')}, transformers "
                f"{env.get('transformers', '?')}, kvsieve {env.get('kvsieve', '?')}, commit "
                f"{(env.get('git_commit') or '?')[:12]}{' (dirty)' if env.get('git_dirty') else ''}",
            ),
            (
                "hardware",
                f"{env.get('cpu', '?')}, {env.get('cpu_cores', '?')} cores, {env.get('memory_gib', '?')} GiB"
                + (f", GPU {', '.join(env['gpu'])}" if env.get("gpu") else ", no GPU"),
            ),
        ]
        rows = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in cells)
        parts.append(f'<table class="meta">{rows}</table>')
    return "\n".join(parts)


def _skip_notes(groups: list[dict[str, Any]]) -> list[str]:
    """The skipped rows of ``groups``, one paragraph per reason."""
    return [f'<p class="note skipped">{html.escape(line)}</p>' for line in skip_notes(groups)]


def _markdown_cell(group: dict[str, Any] | None, n: int) -> str:
    """One budget's cell of a `summary_markdown` line whose ``n`` column says ``n``."""
    if group is None:
        return ""
    if not group["n"]:
        return "skipped"  # beyond the model's window, and the method cannot extrapolate
    if group["task"] == LM_TASK:
        return f"{number_text(group.get('ppl'), 2)} (KL {number_text(group.get('kl'), 3)})"
    text = f"{number_text(group['score'], 2)} {interval_text(group, 2)}"
    if group["retention"] is not None:
        text += f" ({group['retention']:.0%})"
    return text if group["n"] == n else f"{text} n={group['n']}"


def summary_markdown(runs: Sequence[RunData]) -> str:
    """Per task, a Markdown table: one line per prompt length, mode and method, one column per budget; a cell is
    the mean score, its 95% Wilson interval in square brackets and, in round brackets, the retention against the
    full cache (lm: perplexity and KL instead), plus ``n=`` where its count differs from the line's ``n`` (the
    largest); a method that could not run there (beyond the model's window) shows ``skipped``."""
    rows = merge_runs(runs)
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        lines: dict[tuple[int, str, str], dict[str, dict[str, Any]]] = {}
        for length in sorted({int(r["length"]) for r in task_rows}):
            for g in series_groups([r for r in task_rows if int(r["length"]) == length]):
                if g["n"] or g["skipped"]:
                    lines.setdefault((length, g["mode"], g["series"]), {})[g["budget"]] = g
        columns = sorted({b for by_budget in lines.values() for b in by_budget} - {FULL_LABEL}, key=label_order)
        header = ["length", "mode", "method", "n", "no budget (full)", *columns]
        table = [f"**{task}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (length, mode, series), by_budget in lines.items():
            n = max(g["n"] for g in by_budget.values())
            cells = [
                str(length),
                mode,
                series,
                str(n),
                *(_markdown_cell(by_budget.get(b), n) for b in [FULL_LABEL, *columns]),
            ]
            table.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(table))
    return "\n\n".join(out) + "\n"


def build_report(runs: Sequence[RunData], title: str | None = None) -> str:
    """The HTML page for ``runs`` (one or more run directories)."""
    rows = merge_runs(runs)
    series_names = list(dict.fromkeys(r["series"] for r in rows))
    series_names.sort(key=lambda s: s.split(" [")[0] != FULL)
    colors = colors_for(series_names)
    title = title or "kvsieve evaluation: " + ", ".join(run.name for run in runs)
    body = [f"<h1>{html.escape(title)}</h1>", _meta_section(runs)]
    body.append(
        '<p class="note">Score: the task metric in [0, 1] (lm: top-1 agreement with the full cache). Retention: a '
        "method's summed score over the samples and questions where the full cache also ran, divided by the full "
        "cache's. KV: bytes of keys and values held right after compression, measured from the tensors. Prefill: "
        "seconds until the first new token's logits (a shared prefill is apportioned: the common forward plus the "
        "method's own scoring and compression). 95% CI: the Wilson score interval of the mean score over its n rows "
        "(the summed scores as successes).</p>"
    )
    groups = series_groups(rows)
    tasks = list(dict.fromkeys(g["task"] for g in groups))
    body.append("<h2>Summary</h2>")
    body.append(
        html_table(
            list(SUMMARY_COLUMNS),
            [
                [
                    g["task"],
                    g["mode"],
                    g["series"],
                    g["budget"],
                    g["n"],
                    g["score"],
                    interval_text(g),
                    g["retention"],
                    None if g["kv_bytes"] is None else g["kv_bytes"] / 2**20,
                    g["prefill_s"],
                    g["decode_ms_per_token"],
                ]
                for g in groups
            ],
        )
    )
    body.extend(_skip_notes(groups))
    body.append("<h2>Score and retention vs budget</h2>")
    for task in tasks:
        task_groups = [g for g in groups if g["task"] == task]
        body.append(f"<h3>{html.escape(task)}</h3>")
        if any(g["n"] for g in task_groups):
            body.append(score_section(task, task_groups, colors))
        else:  # say why, instead of an empty section
            body.append('<p class="note">No row of this task ran.</p>')
        body.extend(_skip_notes(task_groups))
    heatmaps = []
    for task in tasks:
        if task == LM_TASK:
            continue
        section = heatmap_section(task, [r for r in rows if r["task"] == task])
        if section:
            heatmaps.append(f"<h3>{html.escape(task)}</h3>" + section)
    if heatmaps:
        body.append("<h2>Needle in a haystack: depth x length</h2>")
        body.extend(heatmaps)
    cost = cost_section(rows, colors)
    if cost:
        body.append("<h2>KV memory and latency</h2>")
        body.append(cost)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<p class="note">Written by kvsieve report on {stamp}.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path = "report.html",
    title: str | None = None,
    markdown: str | Path | None = None,
) -> Path:
    """Read ``run_dirs`` and write the HTML page to ``out`` (and `summary_markdown` to ``markdown``); returns
    the page's path."""
    for name, path, example in (("out", out, "report.html"), ("markdown", markdown, "report.md")):
        if path is not None and Path(path).is_dir():
            raise ValueError(
                f"{name} {str(path)!r} is a directory: give the file to write, e.g. {str(Path(path) / example)!r}"
            )
    runs = [load_run(d) for d in run_dirs]
    if not any(run.rows for run in runs):
        raise ValueError(f"no rows in {', '.join(map(str, run_dirs))}: nothing to report")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(runs, title), encoding="utf-8")
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(summary_markdown(runs), encoding="utf-8")
    return out
