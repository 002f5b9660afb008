"""The sections of a report: figures (matplotlib PNGs, inlined as base64) and, under each, the HTML table of the
numbers drawn: score and retention against the budget, needle-in-a-haystack heatmaps, KV memory and latency."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

from kvsieve.budget import FULL_LABEL, Budget, label_order
from kvsieve.eval.config import FULL, LM_TASK
from kvsieve.eval.report_data import group_by
from kvsieve.eval.stats import format_interval, wilson_interval

__all__ = [
    "colors_for",
    "cost_section",
    "heatmap_section",
    "html_table",
    "interval_text",
    "number_text",
    "score_section",
]

MODE_STYLES = {"query_aware": "-", "query_agnostic": "--", "lm": "-"}
MODE_MARKERS = {"query_aware": "o", "query_agnostic": "s", "lm": "o"}


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


def number_text(value: Any, digits: int = 3) -> str:
    """A table cell's text: ``-`` for None or NaN, a float to ``digits`` places, anything else as is."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def interval_text(group: dict[str, Any], digits: int = 3) -> str:
    """A summary group's 95% score interval, as table text."""
    return format_interval(group.get("score_lo"), group.get("score_hi"), digits)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="t">{html.escape(c)}</td>' if isinstance(c, str) else f"<td>{html.escape(number_text(c))}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="numbers">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _budget(label: str) -> Budget | None:
    """The budget a group's label names (None: ``-``, the full cache and methods without a budget)."""
    try:
        return Budget.of(label)
    except ValueError:
        return None


def _is_fraction(label: str) -> bool:
    """True for a budget that is a fraction of the prompt (``0.2``, ``1e-05``); False for token counts."""
    budget = _budget(label)
    return budget is not None and budget.is_fraction


def _budget_axis(labels: Sequence[str]) -> tuple[dict[str, float], list[float], list[str], str]:
    """x positions for budget labels: their values when all are fractions (or all token counts), else ranks."""
    budgets = {b: _budget(b) for b in labels}
    numeric = [b for b in labels if budgets[b] is not None]
    fractions = all(_is_fraction(b) for b in numeric)
    tokens = not any(_is_fraction(b) for b in numeric)
    if numeric and (fractions or tokens):
        positions = {b: float(budgets[b].value) for b in numeric}
        ticks = sorted(positions.values())
        names = [next(b for b in numeric if positions[b] == t) for t in ticks]
        return positions, ticks, names, "budget (fraction of the prompt)" if fractions else "budget (tokens)"
    ordered = sorted(numeric, key=label_order)
    positions = {b: float(i) for i, b in enumerate(ordered)}
    return positions, list(positions.values()), ordered, "budget"


def colors_for(names: Sequence[str]) -> dict[str, Any]:
    """One colour per series name, in order (tab10, or tab20 beyond ten names)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(names) <= 10 else colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------- sections
def score_section(task: str, groups: list[dict[str, Any]], colors: dict[str, Any]) -> str:
    """Score and retention against the budget, one figure per budget unit (fractions of the prompt, token counts:
    a sweep that mixes them gets one of each, never one axis of two units), then the table of every group."""
    compressed = [g for g in groups if g["budget"] != FULL_LABEL and g["n"]]
    unbudgeted = [g for g in groups if g["budget"] == FULL_LABEL and g["n"]]
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
        score = [g["score"], interval_text(g)]
        if is_lm:
            rows.append([g["series"], g["budget"], g["n"], g.get("ppl"), g.get("kl"), *score, g["skipped"]])
        else:
            rows.append([g["mode"], g["series"], g["budget"], g["n"], *score, g["retention"], g["skipped"]])
    return "".join(images) + html_table(header, rows)


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
    positions, ticks, tick_names, xlabel = _budget_axis(sorted({g["budget"] for g in compressed}, key=label_order))
    lines = group_by(compressed, lambda g: (g["series"], g["mode"]))
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


def heatmap_section(task: str, rows: list[dict[str, Any]]) -> str:
    """Mean score per (needle depth, prompt length), one heatmap per method, budget and mode; the table gives each
    cell's count and 95% interval."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return ""
    depths = sorted({round(float(r["depth"]), 4) for r in ok})
    lengths = sorted({int(r["length"]) for r in ok})
    cells = group_by(ok, lambda r: (r["mode"], r["series"], r["budget"]))
    order = list(dict.fromkeys(r["series"] for r in rows))  # the sweep's method order
    keys = sorted(cells, key=lambda k: (k[0], k[1].split(" [")[0] != FULL, order.index(k[1]), label_order(k[2])))
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
        for (depth, length), members in group_by(
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
    return _img(fig, f"{task} needle heatmaps") + html_table(header, table)


def cost_section(rows: list[dict[str, Any]], colors: dict[str, Any]) -> str:
    """KV bytes, prefill time and decode time per method and budget, one bar per prompt length."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return ""
    lengths = sorted({int(r["length"]) for r in ok})
    per = group_by(ok, lambda r: (r["series"], r["budget"], int(r["length"])))
    columns = sorted(
        {(s, b) for s, b, _ in per}, key=lambda k: (k[0] != FULL, list(colors).index(k[0]), label_order(k[1]))
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
    return _img(fig, "KV memory and latency") + html_table(header, table)
