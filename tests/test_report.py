"""The HTML report: self-contained, every plot present, and it renders in headless Chromium without console errors.

The run directory is written from fixture rows shaped like the runner's (a needle depth x length grid, two
methods at two budgets, both modes, an lm task, skip rows): fast, and with scores that make the plots non-trivial.
The Chromium check has a negative control: a page with a corrupt image must log a console error.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from kvsieve.cli import main
from kvsieve.eval.report import build_report, load_run, summary_markdown, write_report
from kvsieve.eval.runner import format_summary, summarize
from kvsieve.eval.stats import wilson_interval

METHODS = {"full": ["-"], "snapkv": ["0.1", "0.5"], "streamingllm": ["0.1", "0.5"]}
DEPTHS = [0.0, 0.5, 1.0]
LENGTHS = [512, 1024]
KV_FULL = 30 * 2 * 3 * 64 * 4  # bytes per token: layers x (K, V) x KV heads x head_dim x fp32


def fixture_score(method: str, budget: str, depth: float, mode: str) -> float:
    """Full finds every needle; StreamingLLM only the recent one; SnapKV loses mid-depth needles at 10%, and more
    of them without the question."""
    if method == "full":
        return 1.0
    if method == "streamingllm":
        return 1.0 if depth == 1.0 else 0.0
    if budget == "0.5":
        return 1.0
    return 0.0 if depth == 0.5 or (mode == "query_agnostic" and depth == 0.0) else 1.0


def fixture_rows() -> list[dict]:
    rows = []
    for length in LENGTHS:
        for mode in ("query_aware", "query_agnostic"):
            for depth in DEPTHS:
                sample_id = f"passkey/L{length}/d{depth:.4f}/s0/0"
                pair = f"passkey|L{length}|{sample_id}|q0|{mode}"
                for method, budgets in METHODS.items():
                    for budget in budgets:
                        fraction = 1.0 if budget == "-" else float(budget)
                        rows.append(
                            {
                                "key": f"{pair}|{method}|{budget}",
                                "pair": pair,
                                "task": "passkey",
                                "length": length,
                                "depth": depth,
                                "sample_id": sample_id,
                                "question": 0,
                                "mode": mode,
                                "method": method,
                                "budget": budget,
                                "status": "ok",
                                "score": fixture_score(method, budget, depth, mode),
                                "metric": "first_int_match",
                                "prediction": "12345",
                                "answers": ["12345"],
                                "kv_bytes": int(KV_FULL * length * fraction),
                                "kv_bytes_full": KV_FULL * length,
                                "kv_stored_tokens": length * fraction,
                                "attended_per_step": length * fraction,
                                "prefill_s": 2.0 * length / 1024 + (0.1 if method == "snapkv" else 0.0),
                                "decode_s_per_token": 0.05 + 0.02 * fraction,
                            }
                        )
    for method, budgets in METHODS.items():  # lm: perplexity rises and agreement falls as the budget shrinks
        for budget in budgets:
            fraction = 1.0 if budget == "-" else float(budget)
            pair = "lm|L1024|lm/L1024/s0/0|q0|lm"
            rows.append(
                {
                    "key": f"{pair}|{method}|{budget}",
                    "pair": pair,
                    "task": "lm",
                    "length": 1024,
                    "depth": None,
                    "mode": "lm",
                    "method": method,
                    "budget": budget,
                    "status": "ok",
                    "metric": "top1_agreement",
                    "score": 0.5 + 0.5 * fraction,
                    "top1_agreement": 0.5 + 0.5 * fraction,
                    "ppl": 20.0 / fraction**0.2,
                    "kl": 0.0 if method == "full" else 0.3 * (1 - fraction),
                    "kv_bytes": int(KV_FULL * 1024 * fraction),
                    "kv_bytes_full": KV_FULL * 1024,
                    "prefill_s": 2.0,
                    "decode_s_per_token": 0.06,
                }
            )
    for method, budgets in METHODS.items():
        for budget in budgets:
            pair = "passkey|L16384|passkey/L16384/d0.5000/s0/0|q0|query_aware"
            rows.append(
                {
                    "key": f"{pair}|{method}|{budget}",
                    "pair": pair,
                    "task": "passkey",
                    "length": 16384,
                    "depth": None,
                    "mode": "query_aware",
                    "method": method,
                    "budget": budget,
                    "status": "skipped",
                    "reason": "16384 positions exceed the model's window of 8192 tokens",
                }
            )
    return rows


def write_run_dir(path: Path, rows: list[dict] | None = None, model: str = "smollm2-135m") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = fixture_rows() if rows is None else rows
    config = {
        "model": model,
        "methods": list(METHODS),
        "budgets": [0.1, 0.5],
        "tasks": ["passkey", "lm"],
        "lengths": [*LENGTHS, 16384],
        "samples": 1,
        "depths": DEPTHS,
        "modes": ["query_aware", "query_agnostic"],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"python": "3.11", "torch": "2.13", "cpu": "test CPU", "cpu_cores": 2, "model": {"type": "llama"}}
    (path / "env.json").write_text(json.dumps(env))
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"complete": True, "rows": len(rows), "elapsed_s": 90.0, "groups": summarize(rows)}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = write_run_dir(tmp_path_factory.mktemp("runs") / "sweep")
    return write_report([run], tmp_path_factory.mktemp("report") / "report.html")


def test_report_is_self_contained_with_every_plot_and_table(report):
    text = report.read_text(encoding="utf-8")
    # nothing fetched from anywhere: every image is inline, no external script, style or link
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text)
    images = re.findall(r'<img class="plot" alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [alt for alt, _ in images] == [
        "lm score vs budget",
        "passkey score vs budget",
        "passkey needle heatmaps",
        "KV memory and latency",
    ]
    assert all(len(data) > 10_000 for _, data in images)
    # the numbers behind the plots: summary + one table per plot
    assert text.count('<table class="numbers">') == 1 + len(images)
    assert "retention" in text and "perplexity" in text and "depth" in text and "KV / full" in text
    # heatmap table: StreamingLLM @ 0.1 finds only the needle at depth 100%
    plain = text.replace(' class="t"', "")
    assert "<td>query_aware</td><td>streamingllm</td><td>0.1</td><td>100%</td><td>1.000</td>" in plain
    assert "<td>query_aware</td><td>streamingllm</td><td>0.1</td><td>50%</td><td>0.000</td>" in plain
    assert "65 ok, 5 skipped" in text  # the rows, counted: 60 passkey + 5 lm, one skip row per method and budget


def test_two_run_directories_and_the_command_line(tmp_path, capsys):
    """Two models: nothing merges, every series names its run."""
    first = write_run_dir(tmp_path / "a")
    second = write_run_dir(tmp_path / "b", model="other-model")
    out = tmp_path / "both.html"
    assert main(["report", str(first), str(second), "--out", str(out), "--title", "two runs"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert "<title>two runs</title>" in text and "snapkv [a]" in text and "snapkv [b]" in text
    assert "full [a]" in text and "full [b]" in text
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not a kvsieve run directory" in capsys.readouterr().err


def test_parts_of_one_sweep_merge(tmp_path):
    """One model, methods split over two runs (each with the full reference): one full series, plain names; a
    method run with other parameters in the second part keeps its run's name."""
    # as the runner writes them: a row's parameters include its budget
    rows = [{**r, "params": {} if r["budget"] == "-" else {"budget": float(r["budget"])}} for r in fixture_rows()]
    snap = [r for r in rows if r["method"] != "streamingllm"]
    stream = [r for r in rows if r["method"] != "snapkv"]
    other = [{**r, "params": {**r["params"], "window_size": 1}} for r in rows if r["method"] == "snapkv"]
    runs = [
        load_run(write_run_dir(tmp_path / "part1", snap)),
        load_run(write_run_dir(tmp_path / "part2", stream + other)),
    ]
    text = build_report(runs).replace(' class="t"', "")
    assert "full [" not in text and "streamingllm [" not in text
    assert "snapkv [part1]" in text and "snapkv [part2]" in text
    # the summary counts the full reference once: 6 passkey rows per mode and method (2 lengths x 3 depths)
    assert "<td>passkey</td><td>query_aware</td><td>full</td><td>-</td><td>6</td><td>1.000</td>" in text
    assert "<td>passkey</td><td>query_aware</td><td>streamingllm</td><td>0.1</td><td>6</td><td>0.333</td>" in text


def test_report_of_a_run_in_progress(tmp_path):
    """No summary yet (a running sweep): the report still renders from the rows."""
    run = write_run_dir(tmp_path / "partial")
    (run / "summary.json").unlink()
    html = build_report([load_run(run)])
    assert "(run not complete)" in html and html.count("<img") == 4


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _chromium(page: Path, screenshot: Path, profile: Path) -> subprocess.CompletedProcess:
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={screenshot}",
        "--window-size=1400,3000",
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    """Chromium logs every page console message (errors and uncaught exceptions included) as ``:CONSOLE``."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    screenshot = tmp_path / "report.png"
    result = _chromium(report, screenshot, tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_messages(result.stderr) == []  # the report logs only when an image fails to decode
    assert _png_size(screenshot) == (1400, 3000)
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]  # floats in [0, 1]
    ink = (pixels.min(axis=-1) < 0.9).mean()
    colourful = ((pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.3).mean()
    assert ink > 0.05, f"the page is nearly blank ({ink:.1%} non-white pixels)"
    assert colourful > 0.005, f"no coloured plot lines or heatmaps visible ({colourful:.2%} coloured pixels)"

    # negative control: a corrupt image is reported on the console
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]{64}", "base64,AAAA", report.read_text(), count=1))
    result = _chromium(broken, tmp_path / "broken.png", tmp_path / "profile2")
    assert any("image failed" in line for line in _console_messages(result.stderr)), result.stderr[-2000:]


def test_markdown_summary_has_scores_and_retention_by_budget(tmp_path):
    run = write_run_dir(tmp_path / "sweep")
    text = summary_markdown([load_run(run)])
    assert text.startswith("**passkey**") and "**lm**" in text
    header = "| length | mode | method | n | no budget (full) | 0.1 | 0.5 |"
    assert header in text
    # StreamingLLM keeps only the recent needle (depth 100%): 1 of 3 depths, retention 1/3 of the full cache's
    assert "| 512 | query_aware | streamingllm | 3 |  | 0.33 [0.06-0.79] (33%) | 0.33 [0.06-0.79] (33%) |" in text
    assert "| 1024 | query_aware | full | 3 | 1.00 [0.44-1.00] (100%) |  |  |" in text
    assert "| 1024 | lm | snapkv | 1 |  | 31.70 (KL 0.270) | 22.97 (KL 0.150) |" in text
    assert "| 16384 | query_aware | snapkv | 0 |  | skipped | skipped |" in text
    out = tmp_path / "summary.md"
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--markdown", str(out)]) == 0
    assert out.read_text() == text


def test_markdown_cells_give_the_interval_and_a_count_that_differs(tmp_path):
    """Wilson intervals beside every score; a cell with fewer rows than its line's ``n`` says how many."""
    rows = [
        r
        for r in fixture_rows()
        if r["key"] != "passkey|L512|passkey/L512/d0.0000/s0/0|q0|query_aware|streamingllm|0.5"
    ]
    text = summary_markdown([load_run(write_run_dir(tmp_path / "sweep", rows))])
    # 1 of 3 needles: [0.06-0.79]; 1 of the remaining 2 (depths 50% and 100%): [0.09-0.91], retention 1/2
    assert "| 512 | query_aware | streamingllm | 3 |  | 0.33 [0.06-0.79] (33%) | 0.50 [0.09-0.91] (50%) n=2 |" in text
    assert "| 512 | query_aware | full | 3 | 1.00 [0.44-1.00] (100%) |  |  |" in text


def test_html_tables_give_the_interval_beside_every_score(tmp_path):
    text = build_report([load_run(write_run_dir(tmp_path / "sweep"))]).replace(' class="t"', "")
    assert text.count("<th>95% CI</th>") == 3 + 2  # summary, two score tables, the heatmap's two lengths
    # summary: StreamingLLM @ 0.1 finds 2 of 6 needles
    assert "<td>passkey</td><td>query_aware</td><td>streamingllm</td><td>0.1</td><td>6</td><td>0.333</td>" in text
    assert "<td>0.333</td><td>[0.097-0.700]</td><td>0.333</td><td>3.375</td>" in text
    # the score table under the plot (1 skip row), and lm's top-1 agreement over its one document
    assert "<td>query_aware</td><td>streamingllm</td><td>0.1</td><td>6</td><td>0.333</td><td>[0.097-0.700]</td>" in text
    assert (
        "<td>snapkv</td><td>0.1</td><td>1</td><td>31.698</td><td>0.270</td><td>0.550</td><td>[0.065-0.955]</td>" in text
    )
    # heatmap cells: one sample each
    assert "<th>L=512</th><th>n</th><th>95% CI</th><th>L=1024</th><th>n</th><th>95% CI</th>" in text
    cell = "<td>1.000</td><td>1</td><td>[0.207-1.000]</td>"
    assert f"<td>query_aware</td><td>streamingllm</td><td>0.1</td><td>100%</td>{cell}{cell}" in text


def test_score_plots_draw_the_intervals(tmp_path, monkeypatch):
    """Error bars span each score's interval; the full cache's line gets a band."""
    from matplotlib.axes import Axes

    bars, bands = [], []
    errorbar, axhspan = Axes.errorbar, Axes.axhspan

    def spy_errorbar(self, x, y, *args, **kwargs):
        below, above = kwargs["yerr"]
        bars.extend((round(v - b, 3), round(v + a, 3)) for v, b, a in zip(y, below, above))
        return errorbar(self, x, y, *args, **kwargs)

    def spy_axhspan(self, lo, hi, *args, **kwargs):
        bands.append((round(lo, 3), round(hi, 3)))
        return axhspan(self, lo, hi, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy_errorbar)
    monkeypatch.setattr(Axes, "axhspan", spy_axhspan)
    build_report([load_run(write_run_dir(tmp_path / "sweep"))])
    two_of_six, six_of_six, four_of_six = (tuple(round(v, 3) for v in wilson_interval(k, 6)) for k in (2, 6, 4))
    # passkey: 2 modes x 2 methods x 2 budgets (StreamingLLM and query-agnostic SnapKV @ 0.1 find 2 of 6 needles);
    # lm: 2 methods x 2 budgets
    assert len(bars) == 8 + 4
    assert bars.count(two_of_six) == 5 and bars.count(six_of_six) == 2 and bars.count(four_of_six) == 1
    assert sorted(bands) == [(0.207, 1.0), six_of_six, six_of_six]  # lm's one document, passkey's two modes


def test_summarize_counts_and_intervals():
    """n, score_lo/hi and the full cache's over the pairs retention compares, for hand-made rows."""

    def row(method: str, budget: str, pair: str, score: float | None, task: str = "niah") -> dict:
        status = "skipped" if score is None else "ok"
        base = {"task": task, "mode": "query_aware", "method": method, "budget": budget, "pair": pair}
        return {**base, "status": status, **({} if score is None else {"score": score})}

    method_scores = [1, 1, 1, 1, 1, 1, 0, 0, 1, 1]  # 8 of 10; the full cache ran on the first 8 pairs only
    rows = [row("full", "-", f"p{i}", s) for i, s in enumerate([1, 1, 1, 1, 1, 1, 1, 0])]
    rows += [row("snapkv", "0.1", f"p{i}", s) for i, s in enumerate(method_scores)]
    rows += [row("snapkv", "0.1", "p10", None), row("snapkv", "0.5", "p0", None)]
    rows += [row("snapkv", "0.1", f"q{i}", s, "part") for i, s in enumerate([0.5, 0.25, 1.0, 0.0])]
    groups = {(g["task"], g["method"], g["budget"]): g for g in summarize(rows)}

    snap = groups["niah", "snapkv", "0.1"]
    assert (snap["n"], snap["skipped"], snap["score"]) == (10, 1, 0.8)
    assert (snap["score_lo"], snap["score_hi"]) == pytest.approx((0.490, 0.943), abs=5e-4)
    assert snap["retention"] == pytest.approx(6 / 7)
    assert (snap["full_n"], snap["full_score"]) == (8, 7 / 8)
    assert (snap["full_score_lo"], snap["full_score_hi"]) == wilson_interval(7, 8)
    full = groups["niah", "full", "-"]
    assert (full["n"], full["full_n"], full["score"], full["full_score"]) == (8, 8, 7 / 8, 7 / 8)
    assert (full["score_lo"], full["score_hi"]) == (full["full_score_lo"], full["full_score_hi"])
    # fractional scores (string_match_part): the summed score is the count of successes; no full cache here
    part = groups["part", "snapkv", "0.1"]
    assert (part["n"], part["score"]) == (4, 0.4375)
    assert (part["score_lo"], part["score_hi"]) == wilson_interval(1.75, 4)
    assert (part["full_n"], part["full_score"], part["full_score_lo"], part["full_score_hi"]) == (0, None, None, None)
    # nothing ran: no interval, and the summary stays JSON without NaN
    none = groups["niah", "snapkv", "0.5"]
    assert (none["n"], none["score"], none["score_lo"], none["score_hi"]) == (0, None, None, None)
    json.dumps(list(groups.values()), allow_nan=False)

    table = format_summary(list(groups.values()))
    assert "95% CI" in table.splitlines()[0]
    assert re.search(r"0\.800\s+\[0\.490-0\.943\]\s+0\.857", table)


def test_a_budget_axis_of_fractions_and_token_counts_gets_one_panel_per_unit(tmp_path):
    """Fractions of the prompt and token counts are different units: never ranks on one axis."""
    rows = [r for r in fixture_rows() if r["task"] == "passkey" and r["status"] == "ok"]
    tokens = [
        {**r, "key": r["key"].replace("|0.5", "|256"), "budget": "256"}
        for r in rows
        if r["method"] == "snapkv" and r["budget"] == "0.5"
    ]
    text = build_report([load_run(write_run_dir(tmp_path / "mixed", rows + tokens))])
    alts = re.findall(r'<img class="plot" alt="([^"]+)"', text)
    assert alts[:2] == ["passkey score vs budget (fraction of the prompt)", "passkey score vs budget (tokens)"]
    plain = build_report([load_run(write_run_dir(tmp_path / "plain", rows))])
    assert re.findall(r'<img class="plot" alt="([^"]+)"', plain)[0] == "passkey score vs budget"


def test_skip_reasons_in_the_summary_and_on_the_page(tmp_path):
    reason = "16384 positions exceed the model's window of 8192 tokens"
    rows = fixture_rows()
    assert f"note: 5 rows skipped (passkey; full, snapkv, streamingllm): {reason}" in format_summary(summarize(rows))
    text = html.unescape(build_report([load_run(write_run_dir(tmp_path / "sweep", rows))]))
    assert f"5 rows skipped (passkey; full, snapkv, streamingllm): {reason}" in text
    # a task none of whose rows ran: its section says so and why, instead of being empty
    skipped = [{**r, "task": "niah_single_2", "key": "n" + r["key"]} for r in rows if r["status"] == "skipped"]
    text = html.unescape(build_report([load_run(write_run_dir(tmp_path / "beyond", [*rows, *skipped]))]))
    section = text.split("<h3>niah_single_2</h3>")[1].split("<h")[0]
    assert "No row of this task ran." in section and reason in section
