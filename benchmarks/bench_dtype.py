"""bfloat16 against float32 on the CPU: prefill and decode of every method, the two dtypes alternating.

The model is loaded once per dtype; every repetition runs `kvsieve.bench.bench` (one repetition) on the float32
model, then on the bfloat16 one (the order alternating from repetition to repetition), so drift on a shared machine
hits both alike. The ratio bfloat16 / float32 is taken pair by pair within a repetition; the table gives its median
and range. Single-query attention in reduced precision goes through kvsieve's grouped-matmul path on a CPU
(`kvsieve.ops.attention.decode_attention`): torch's sdpa is many times slower there.

    OMP_NUM_THREADS=2 python benchmarks/bench_dtype.py --methods snapkv,h2o --budgets 819 --lengths 4096 \\
        --repeats 3 --threads 2 --out docs/results/bench_dtype.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import kvsieve
from kvsieve.bench import bench
from kvsieve.eval.environment import environment

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pair_ratios(values: list[float | None], reference: list[float | None]) -> list[float]:
    """``values[i] / reference[i]`` where both were measured."""
    return [a / b for a, b in zip(values, reference) if a is not None and b]


def summarize(measured: dict[str, list[list]]) -> list[dict]:
    """Rows of one (method, budget, tokens): each dtype's medians and the paired bfloat16 / float32 ratios."""
    out = []
    for i, first in enumerate(measured["float32"][0]):
        row = {"method": first.method, "budget": first.budget, "tokens": first.tokens}
        for name in DTYPES:
            reps = [rep[i] for rep in measured[name]]
            row[name] = {
                "prefill_s": [r.prefill_s for r in reps],
                "decode_ms": [r.decode_ms_per_token for r in reps],
                "kv_bytes": reps[0].kv_bytes,
            }
        for key in ("prefill_s", "decode_ms"):
            row[f"{key}_ratio"] = pair_ratios(row["bfloat16"][key], row["float32"][key])
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    def med(values: list) -> str:
        kept = [v for v in values if v is not None]
        return f"{statistics.median(kept):.3g}" if kept else "-"

    def ratio(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [
        "| tokens | method | budget | prefill s fp32 / bf16 | bf16/fp32 (range) | decode ms/token fp32 / bf16 "
        "| bf16/fp32 (range) | KV MiB fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["float32"], r["bfloat16"]
        lines.append(
            f"| {r['tokens']} | {r['method']} | {r['budget']} | {med(a['prefill_s'])} / {med(b['prefill_s'])} "
            f"| {ratio(r['prefill_s_ratio'])} | {med(a['decode_ms'])} / {med(b['decode_ms'])} "
            f"| {ratio(r['decode_ms_ratio'])} | {a['kv_bytes'] / 2**20:.1f} / {b['kv_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="kvsieve model alias or directory (default: the default model)")
    parser.add_argument("--methods", default="snapkv", help="comma-separated method names (full always runs)")
    parser.add_argument("--budgets", default="0.2", help="comma-separated budgets: ints or fractions")
    parser.add_argument("--lengths", default="4096", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the measurements here (JSON)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    models = {name: kvsieve.load_model(args.model, dtype=dtype) for name, dtype in DTYPES.items()}
    measured: dict[str, list[list]] = {name: [] for name in DTYPES}
    for rep in range(args.repeats):
        order = list(DTYPES) if rep % 2 == 0 else list(reversed(DTYPES))
        for name in order:
            model, tok = models[name]
            rows = bench(model, tok, methods, lengths, budgets, new_tokens=args.new_tokens, repeats=1, warmup=rep == 0)
            measured[name].append(rows)
        print(f"repetition {rep + 1}/{args.repeats} done", flush=True)
    rows = summarize(measured)
    env = environment(models["float32"][0])
    print(f"{env.get('cpu')} ({env.get('cpu_cores')} cores), {torch.get_num_threads()} torch threads, "
          f"torch {env.get('torch')}; {args.repeats} repetitions")  # fmt: skip
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
