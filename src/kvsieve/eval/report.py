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

import base64
import datetime
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvsieve.eval.config import FULL, LM_TASK
from kvsieve.eval.rundir import CONFIG, ENV, SUMMARY, rows_files, run_rows
from kvsieve.eval.stats import format_interval, wilson_interval
from kvsieve.eval.summary import budget_order, skip_notes, summarize

__all__ = ["RunData", "build_report", "load_run", "summary_markdown", "write_report"]

MODE_STYLES = {"query_aware": "-", "query_agnostic": "--", "lm": "-"}
MODE_MARKERS = {"query_aware": "o", "query_agnostic": "s", "lm": "o"}


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


# ----------------------------------------------------------------------------------------------- helpers
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _img(fig, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _interval(group: dict[str, Any], digits: int = 3) -> str:
    """A summary group's 95% score interval, as table text."""
    return format_interval(group.get("score_lo"), group.get("score_hi"), digits)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="t">{html.escape(c)}</td>' if isinstance(c, str) else f"<td>{html.escape(_fmt(c))}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="numbers">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _budget_value(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def _is_fraction(label: str) -> bool:
    """A budget label written as a float (``0.2``, ``1e-05``) is a fraction of the prompt; an int counts tokens."""
    return any(c in label for c in ".eE")


def _budget_axis(labels: Sequence[str]) -> tuple[dict[str, float], list[float], list[str], str]:
    """x positions for budget labels: their values when all are fractions (or all token counts), else ranks."""
    values = {b: _budget_value(b) for b in labels}
    numeric = [b for b in labels if values[b] is not None]
    fractions = all(_is_fraction(b) for b in numeric)
    tokens = not any(_is_fraction(b) for b in numeric)
    if numeric and (fractions or tokens):
        positions = {b: values[b] for b in numeric}
        ticks = sorted(positions.values())
        names = [next(b for b in numeric if positions[b] == t) for t in ticks]
        return positions, ticks, names, "budget (fraction of the prompt)" if fractions else "budget (tokens)"
    ordered = sorted(numeric, key=budget_order)
    positions = {b: float(i) for i, b in enumerate(ordered)}
    return positions, list(positions.values()), ordered, "budget"


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(names) <= 10 else colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _merge_runs(runs: Sequence[RunData]) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------------------------- sections
def _score_section(task: str, groups: list[dict[str, Any]], colors: dict[str, Any]) -> str:
    """Score and retention against the budget, one figure per budget unit (fractions of the prompt, token counts:
    a sweep that mixes them gets one of each, never one axis of two units), then the table of every group."""
    compressed = [g for g in groups if g["budget"] != "-" and g["n"]]
    unbudgeted = [g for g in groups if g["budget"] == "-" and g["n"]]
    fractions = [g for g in compressed if _is_fraction(g["budget"])]
    tokens = [g for g in compressed if not _is_fraction(g["budget"])]
    parts = [fractions, tokens] if fractions and tokens else [compressed]
    images = [_score_figure(task, part, unbudgeted, colors, len(parts) > 1) for part in parts]
    is_lm = task == LM_TASK
    header = ["mode", "method", "budget", "n", "score", "95% CI", "retention", "skipped"]
    if is_lm:
        header = ["method", "budget", "n", "perplexity", "KL", "top-1 agreement", "95% CI", "skipped"]
    rows = []
    for g in groups:
        score = [g["score"], _interval(g)]
        if is_lm:
            rows.append([g["series"], g["budget"], g["n"], g.get("ppl"), g.get("kl"), *score, g["skipped"]])
        else:
            rows.append([g["mode"], g["series"], g["budget"], g["n"], *score, g["retention"], g["skipped"]])
    return "".join(images) + _table(header, rows)


def _score_figure(
    task: str, compressed: list[dict[str, Any]], unbudgeted: list[dict[str, Any]], colors: dict[str, Any], split: bool
) -> str:
    """One figure of score and retention against one unit of budget, per method (colour) and mode (line style);
    scores with their 95% intervals (error bars; a band around the full cache's line). Series are nudged apart
    along x by up to 2% of the axis, so that equal intervals at one budget stay distinguishable."""
    is_lm = task == LM_TASK
    panels = [("score", "top-1 agreement with the full cache" if is_lm else "score"), ("retention", "retention")]
    if is_lm:
        panels = [("ppl", "perplexity"), ("kl", "KL(full || method), nats/token"), ("score", "top-1 agreement")]
    fig = _figure(5.2 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels))
    positions, ticks, tick_names, xlabel = _budget_axis(sorted({g["budget"] for g in compressed}, key=budget_order))
    lines = _by(compressed, lambda g: (g["series"], g["mode"]))
    step = 0.04 * (ticks[-1] - ticks[0] if len(ticks) > 1 else 1.0) / max(1, len(lines) - 1)
    for ax, (field, label) in zip(axes, panels):
        for k, ((series, mode), members) in enumerate(lines.items()):
            nudge = (k - (len(lines) - 1) / 2) * step
            points = sorted(
                (positions[g["budget"]] + nudge, g[field], g["score_lo"], g["score_hi"])
                for g in members
                if g.get(field) is not None and g["budget"] in positions
            )
            if points:
                xs, ys, los, his = zip(*points)
                if field == "score":
                    below = [y - lo for y, lo in zip(ys, los)]
                    above = [hi - y for y, hi in zip(ys, his)]
                    ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=colors[series], capsize=3, alpha=0.6)
                ax.plot(
                    xs,
                    ys,
                    MODE_STYLES.get(mode, "-"),
                    marker=MODE_MARKERS.get(mode, "o"),
                    color=colors[series],
                    label=f"{series} ({mode})" if not is_lm else series,
                )
        for g in unbudgeted:  # the full cache (black) and methods without a budget
            value = (1.0 if g["method_key"] == FULL else g.get(field)) if field == "retention" else g.get(field)
            if value is not None:
                color = "black" if g["method_key"] == FULL else colors[g["series"]]
                ax.axhline(value, color=color, linestyle=MODE_STYLES.get(g["mode"], "-"), linewidth=0.8, alpha=0.6)
                if field == "score":
                    ax.axhspan(g["score_lo"], g["score_hi"], color=color, alpha=0.08, linewidth=0)
        if ticks:
            ax.set_xticks(ticks, tick_names)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if field in ("score", "retention") and not is_lm:
            ax.set_ylim(-0.05, max([1.05, *((g.get(field) or 0) + 0.05 for g in compressed)]))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # beside the panels, never over the lines
        fig.legend(handles, labels, fontsize=7, loc="outside right upper")
    unit = f" ({xlabel.removeprefix('budget (').removesuffix(')')})" if split else ""
    fig.suptitle(f"{task}{unit}: black lines = full cache", fontsize=10)
    return _img(fig, f"{task} score vs budget{unit}")


def _heatmap_section(task: str, rows: list[dict[str, Any]]) -> str:
    """Mean score per (needle depth, prompt length), one heatmap per method, budget and mode; the table gives each
    cell's count and 95% interval."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return ""
    depths = sorted({round(float(r["depth"]), 4) for r in ok})
    lengths = sorted({int(r["length"]) for r in ok})
    cells = _by(ok, lambda r: (r["mode"], r["series"], r["budget"]))
    order = list(dict.fromkeys(r["series"] for r in rows))  # the sweep's method order
    keys = sorted(cells, key=lambda k: (k[0], k[1].split(" [")[0] != FULL, order.index(k[1]), budget_order(k[2])))
    n_cols = min(4, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig = _figure(3.2 * n_cols + 0.8, 2.6 * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    table = []
    image = None
    for ax, key in zip(axes.flat, keys):
        grid = [[math.nan] * len(lengths) for _ in depths]
        counts = [[0] * len(lengths) for _ in depths]
        intervals = [["-"] * len(lengths) for _ in depths]
        for (depth, length), members in _by(
            cells[key], lambda r: (round(float(r["depth"]), 4), int(r["length"]))
        ).items():
            i, j = depths.index(depth), lengths.index(length)
            total = sum(r["score"] for r in members)
            grid[i][j], counts[i][j] = total / len(members), len(members)
            intervals[i][j] = format_interval(*wilson_interval(total, len(members)), 3)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        mode, series, budget = key
        ax.set_title(f"{series} @ {budget}\n{mode}", fontsize=8)
        ax.set_xlabel("length (tokens)", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        for i, depth in enumerate(depths):
            by_length = (c for j in range(len(lengths)) for c in (grid[i][j], counts[i][j], intervals[i][j]))
            table.append([mode, series, budget, f"{depth:.0%}", *by_length])
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="score")
    fig.suptitle(f"{task}: needle in a haystack (depth x length)", fontsize=10)
    header = ["mode", "method", "budget", "depth", *(h for n in lengths for h in (f"L={n}", "n", "95% CI"))]
    return _img(fig, f"{task} needle heatmaps") + _table(header, table)


def _cost_section(rows: list[dict[str, Any]], colors: dict[str, Any]) -> str:
    """KV bytes, prefill time and decode time per method and budget, one bar per prompt length."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return ""
    lengths = sorted({int(r["length"]) for r in ok})
    per = _by(ok, lambda r: (r["series"], r["budget"], int(r["length"])))
    columns = sorted(
        {(s, b) for s, b, _ in per}, key=lambda k: (k[0] != FULL, list(colors).index(k[0]), budget_order(k[1]))
    )
    metrics = [
        ("kv_bytes", "KV after compression (MiB)", 1 / 2**20),
        ("prefill_s", "prefill (s)", 1.0),
        ("decode_s_per_token", "decode (ms / token)", 1000.0),
    ]
    fig = _figure(max(8.0, 0.45 * len(columns) * len(lengths) + 3), 3.2 * len(metrics))
    axes = fig.subplots(len(metrics), 1, sharex=True)
    width = 0.8 / len(lengths)
    table = []
    means: dict[tuple, dict[str, float | None]] = {}
    for (series, budget, length), members in per.items():
        entry = {}
        for field, _, scale in [*metrics, ("kv_bytes_full", "", 1 / 2**20), ("attended_per_step", "", 1.0)]:
            values = [r[field] for r in members if r.get(field) is not None]
            entry[field] = scale * sum(values) / len(values) if values else None
        means[(series, budget, length)] = entry
    for ax, (field, label, _) in zip(axes, metrics):
        for j, length in enumerate(lengths):
            xs, ys, cs = [], [], []
            for i, (series, budget) in enumerate(columns):
                value = means.get((series, budget, length), {}).get(field)
                if value is not None:
                    xs.append(i + (j - (len(lengths) - 1) / 2) * width)
                    ys.append(value)
                    cs.append(colors[series])
            ax.bar(xs, ys, width=width * 0.95, color=cs, alpha=0.45 + 0.55 * (j + 1) / len(lengths))
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    shades = [Patch(color="0.35", alpha=0.45 + 0.55 * (j + 1) / len(lengths)) for j in range(len(lengths))]
    axes[0].legend(shades, [f"L={n}" for n in lengths], fontsize=7, title="prompt length", title_fontsize=7)
    axes[-1].set_xticks(range(len(columns)), [f"{s} @ {b}" for s, b in columns], rotation=45, ha="right", fontsize=7)
    fig.suptitle("KV memory and latency per method and budget", fontsize=10)
    for series, budget in columns:
        for length in lengths:
            entry = means.get((series, budget, length))
            if entry is None:
                continue
            fraction = (
                entry["kv_bytes"] / entry["kv_bytes_full"]
                if entry["kv_bytes"] is not None and entry["kv_bytes_full"]
                else None
            )
            table.append(
                [
                    series,
                    budget,
                    length,
                    entry["kv_bytes"],
                    fraction,
                    entry["attended_per_step"],
                    entry["prefill_s"],
                    entry["decode_s_per_token"],
                ]
            )
    header = ["method", "budget", "length", "KV MiB", "KV / full", "attended / step", "prefill s", "decode ms/tok"]
    return _img(fig, "KV memory and latency") + _table(header, table)


def _by(items, key) -> dict[Any, list]:
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


# ------------------------------------------------------------------------------------------------- page
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


def _groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`summarize` over merged rows, per series (``method`` is the series name, ``method_key`` the method)."""
    method_of = {r["series"]: r["method"] for r in rows}
    return [
        {**g, "series": g["method"], "method_key": method_of[g["method"]]}
        for g in summarize([{**r, "method": r["series"]} for r in rows])
    ]


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
        return f"{_fmt(group.get('ppl'), 2)} (KL {_fmt(group.get('kl'), 3)})"
    text = f"{_fmt(group['score'], 2)} {_interval(group, 2)}"
    if group["retention"] is not None:
        text += f" ({group['retention']:.0%})"
    return text if group["n"] == n else f"{text} n={group['n']}"


def summary_markdown(runs: Sequence[RunData]) -> str:
    """Per task, a Markdown table: one line per prompt length, mode and method, one column per budget; a cell is
    the mean score, its 95% Wilson interval in square brackets and, in round brackets, the retention against the
    full cache (lm: perplexity and KL instead), plus ``n=`` where its count differs from the line's ``n`` (the
    largest); a method that could not run there (beyond the model's window) shows ``skipped``."""
    rows = _merge_runs(runs)
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        lines: dict[tuple[int, str, str], dict[str, dict[str, Any]]] = {}
        for length in sorted({int(r["length"]) for r in task_rows}):
            for g in _groups([r for r in task_rows if int(r["length"]) == length]):
                if g["n"] or g["skipped"]:
                    lines.setdefault((length, g["mode"], g["series"]), {})[g["budget"]] = g
        columns = sorted({b for by_budget in lines.values() for b in by_budget} - {"-"}, key=budget_order)
        header = ["length", "mode", "method", "n", "no budget (full)", *columns]
        table = [f"**{task}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (length, mode, series), by_budget in lines.items():
            n = max(g["n"] for g in by_budget.values())
            cells = [str(length), mode, series, str(n), *(_markdown_cell(by_budget.get(b), n) for b in ["-", *columns])]
            table.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(table))
    return "\n\n".join(out) + "\n"


def build_report(runs: Sequence[RunData], title: str | None = None) -> str:
    """The HTML page for ``runs`` (one or more run directories)."""
    rows = _merge_runs(runs)
    series_names = list(dict.fromkeys(r["series"] for r in rows))
    series_names.sort(key=lambda s: s.split(" [")[0] != FULL)
    colors = _colors(series_names)
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
    groups = _groups(rows)
    tasks = list(dict.fromkeys(g["task"] for g in groups))
    body.append("<h2>Summary</h2>")
    body.append(
        _table(
            [
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
            ],
            [
                [
                    g["task"],
                    g["mode"],
                    g["series"],
                    g["budget"],
                    g["n"],
                    g["score"],
                    _interval(g),
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
            body.append(_score_section(task, task_groups, colors))
        else:  # say why, instead of an empty section
            body.append('<p class="note">No row of this task ran.</p>')
        body.extend(_skip_notes(task_groups))
    heatmaps = []
    for task in tasks:
        if task == LM_TASK:
            continue
        section = _heatmap_section(task, [r for r in rows if r["task"] == task])
        if section:
            heatmaps.append(f"<h3>{html.escape(task)}</h3>" + section)
    if heatmaps:
        body.append("<h2>Needle in a haystack: depth x length</h2>")
        body.extend(heatmaps)
    cost = _cost_section(rows, colors)
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
