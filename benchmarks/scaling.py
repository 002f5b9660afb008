"""Prefill time and peak memory against prompt length, every method, one fresh process per measurement.

Memory is measured in a child of its own: it runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB, so
that every tensor of any size lives in its own mapping and goes back to the system when freed, loads the model,
warms up on a 64-token prompt, resets the resident-set high-water mark (``/proc/self/clear_refs``, Linux), prefills
the prompt through `kvsieve.generate` (one new token) and reports how far the high-water mark rose above the
resident set at the reset (``peak_mib``: activations, attention workspace, the cache and the method's scoring).
Timing runs in other children with the allocator as it is (``--repeats`` of them; the median and the half-range
are given). On CUDA the allocator's peak during the prefill is reported instead.

Linear means: the time per token and the peak per token stay flat as the prompt grows; an n x n score matrix
would make the peak grow fourfold per doubling. The table gives each method's growth exponent over the lengths
measured (log of the ratio over log of the length ratio: 1 linear, 2 quadratic), from the medians.

Rows are appended to ``OUT/rows.jsonl`` as each cell finishes; a rerun with the same ``--out`` skips the cells
there.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --methods snapkv,h2o,nacl,refreshkv,infllm,actqkv \\
        --budget 0.2 --lengths 1024,2048,4096,8192 --repeats 2 --threads 1 --out docs/results/scaling
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

WARMUP_TOKENS = 64
# every allocation above 64 KiB in its own mapping, unmapped when freed: the resident set follows live memory
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def high_water_rise_mib(fn: Callable[[], Any]) -> float:
    """How far the resident set's high-water mark rises above the resident set while ``fn()`` runs, in MiB:
    the mark is reset first (``/proc/self/clear_refs``; Linux), so what ran before in this process does not hide
    the peak. Memory freed but kept by the C allocator counts as resident: see ``MEMORY_ENV``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    fn()
    return max(0.0, _status_mib("VmHWM") - before)


def measure_one(model_name: str, method_name: str, budget: float | int, length: int, threads: int | None,
                chunk_size: int | None, dtype: str, what: str) -> dict[str, Any]:  # fmt: skip
    """In this fresh process: ``what="time"``: the prefill seconds; ``"memory"``: the rise of the memory
    high-water mark during the prefill, in MiB (on the CPU, meaningful only under ``MEMORY_ENV``)."""
    import torch

    import kvsieve
    from kvsieve.bench import bench_runs, prompt_ids

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = kvsieve.load_model(model_name, dtype=getattr(torch, dtype))
    budgets = [budget] if method_name != "full" else [0.2]
    run = next(r for r in bench_runs([method_name], [length], budgets) if r.name == method_name)
    cuda = next(model.parameters()).is_cuda

    def prefill(n: int) -> float:
        out = kvsieve.generate(
            model, tokenizer, prompt_ids(tokenizer, n), method=run.method, max_new_tokens=1, chunk_size=chunk_size,
            chat=False, stop_at_eos=False,
        )  # fmt: skip
        return out.stats.prefill_s

    prefill(WARMUP_TOKENS)
    if what == "time":
        return {"prefill_s": prefill(length)}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        prefill(length)
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "device": "cuda"}
    return {"peak_mib": high_water_rise_mib(lambda: prefill(length)), "device": "cpu"}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, **MEMORY_ENV) if spec["what"] == "memory" else None
    child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           env=env)  # fmt: skip
    if child.returncode != 0:
        last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit {child.returncode}"
        raise RuntimeError(f"{spec['method_name']} at {spec['length']} tokens ({spec['what']}): {last}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def cell_key(row: dict[str, Any]) -> tuple:
    return (row["method"], row["length"], row["repeat"])


def growth_exponent(lengths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(length): 1 for linear growth, 2 for quadratic."""
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values) if v > 0]
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per method, the median prefill seconds and peak MiB at each length, and the growth exponents."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    header = ["method"] + [f"{n} s / MiB" for n in lengths] + ["time exponent", "memory exponent"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells, times, peaks, at = [], [], [], []
        for n in lengths:
            mine = [r for r in rows if r["method"] == method and r["length"] == n]
            if not mine:
                cells.append("-")
                continue
            t = statistics.median(r["prefill_s"] for r in mine)
            p = statistics.median(r["peak_mib"] for r in mine if "peak_mib" in r)
            spread = max(r["prefill_s"] for r in mine) - min(r["prefill_s"] for r in mine)
            cells.append(f"{t:.2f} (±{spread / 2:.2f}) / {p:.0f}")
            times.append(t)
            peaks.append(p)
            at.append(n)
        te, me = growth_exponent(at, times), growth_exponent(at, peaks)
        lines.append(
            "| " + " | ".join([method, *cells, "-" if te is None else f"{te:.2f}", "-" if me is None else f"{me:.2f}"])
            + " |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="kvsieve model alias or directory")
    parser.add_argument("--methods", default="snapkv,pyramidkv,h2o,streamingllm,nacl,refreshkv,infllm,actqkv",
                        help="comma-separated registered method names (the full cache always runs)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=0.2, help="fraction (<1) or entries (>=1), every method")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (every method)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    parser.add_argument("--out", type=Path, default=None, help="run directory: rows.jsonl (resumes)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(measure_one(**spec)))
        return 0

    from kvsieve.bench import bench_runs
    from kvsieve.eval.config import budget_label

    budget: float | int = int(args.budget) if args.budget >= 1 else args.budget
    lengths = [int(x) for x in args.lengths.split(",") if x]
    methods = ["full"] + [m for m in args.methods.split(",") if m and m != "full"]
    bench_runs(methods, lengths, [budget], repeats=args.repeats, chunk_size=args.chunk_size)  # validates, no model
    rows: list[dict[str, Any]] = []
    rows_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        rows_path = args.out / "rows.jsonl"
        if rows_path.exists():
            rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    done = {cell_key(r) for r in rows}
    for n in lengths:
        for repeat in range(args.repeats):
            for method in methods:
                if (method, n, repeat) in done:
                    continue
                spec = {"model_name": args.model, "method_name": method, "budget": budget, "length": n,
                        "threads": args.threads, "chunk_size": args.chunk_size, "dtype": args.dtype}  # fmt: skip
                try:
                    timed = run_child({**spec, "what": "time"})
                    memory = run_child({**spec, "what": "memory"}) if repeat == 0 else {}
                except RuntimeError as error:
                    print(f"scaling: {error}", file=sys.stderr)
                    return 1
                row = {"method": method, "budget": budget_label(None if method == "full" else budget), "length": n,
                       "repeat": repeat, "model": args.model, "dtype": args.dtype, "threads": args.threads,
                       "chunk_size": args.chunk_size, **timed, **memory}  # fmt: skip
                rows.append(row)
                peak = "" if "peak_mib" not in row else f", peak +{row['peak_mib']:.0f} MiB"
                print(f"{method} L{n} ({repeat + 1}/{args.repeats}): {row['prefill_s']:.2f} s{peak}", flush=True)
                if rows_path is not None:
                    with rows_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
