"""Decode at long context, where attention dominates: every method at one budget against the full cache and the floor.

For each prompt length, one shared prefill (`kvsieve.prefill_sharing.shared_prefill`, in chunks) builds the full
cache and the cache of every method that compresses after a plain prefill (SnapKV, PyramidKV, H2O, StreamingLLM,
NACL, RefreshKV); InfLLM and ActQKV prefill on their own (their prefill is the method). Then, repetition by
repetition and method by method, a copy of each cache decodes ``--new-tokens`` greedy tokens: decode ms/token is
the median over the repetitions, the speed-up is the full cache's time over the method's and the floor ratio the
method's time over the full cache's at a prompt whose steps attend as many entries (`kvsieve.bench.floor_length`),
both paired within a repetition. The prompt is the public-domain text of ``kvsieve bench``.

Each prompt length is a unit of work: its rows are appended to ``OUT/rows.jsonl`` when the length is done, and a
rerun with the same ``--out`` skips the lengths already there (an interrupted length is redone).

    OMP_NUM_THREADS=1 python benchmarks/long_decode.py --model qwen2.5-coder-0.5b --lengths 16384,32768 \\
        --budget 2048 --threads 1 --dtype bfloat16 --out docs/results/long_decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kvsieve
from kvsieve.bench import floor_length, prompt_ids
from kvsieve.driver import Driver
from kvsieve.eval.config import budget_label
from kvsieve.eval.environment import environment
from kvsieve.generate import decode
from kvsieve.prefill_sharing import shared_prefill, shares_prefill

DEFAULT_METHODS = "snapkv,pyramidkv,h2o,streamingllm,nacl,refreshkv,infllm,actqkv"


def build_caches(model, ids: list[int], methods: dict[str, kvsieve.Method], chunk_size: int, reserve: int) -> dict:
    """Prefill ``ids`` for the full cache and every method: ``{name: (driver, last logits, prefill seconds)}``."""
    shared = {name: m for name, m in methods.items() if shares_prefill(m)}
    out: dict[str, tuple[Driver, torch.Tensor, float]] = {}
    result = shared_prefill(model, list(shared.values()), ids, chunk_size=chunk_size, reserve=reserve)
    out["full"] = (Driver(model, result.full), result.full_logits, result.shared_s)
    for name, cache, logits, seconds in zip(shared, result.caches, result.logits, result.method_s):
        out[name] = (Driver(model, cache), logits, result.shared_s + seconds)
    for name, method in methods.items():
        if name in shared:
            continue
        driver = Driver.new(model, method, len(ids), reserve=reserve)
        logits = driver.prefill(ids, chunk_size)
        out[name] = (driver, logits, driver.timings.prefill_s)
    return out


@torch.inference_mode()
def time_decode(driver: Driver, logits: torch.Tensor, new_tokens: int) -> tuple[float, float | None]:
    """Decode ``new_tokens`` greedy tokens from a copy of the driver's cache: (ms/token, attended entries/step)."""
    twin = driver.copy()
    twin.timings.decode_s, twin.timings.decode_steps = 0.0, 0
    mark = twin.mark()
    decode(twin, logits, new_tokens)
    return 1e3 * twin.timings.decode_s_per_token, twin.attended_since(mark)


IdsOf = Callable[[int], list[int]]  # prompt length -> token ids
DecodeTimer = Callable[[str, Driver, torch.Tensor, int], tuple[float, float | None]]


def timed(name: str, driver: Driver, logits: torch.Tensor, new_tokens: int) -> tuple[float, float | None]:
    """The plain `DecodeTimer`: `time_decode`, whatever the method (``name``; the floor's is ``"floor"``)."""
    return time_decode(driver, logits, new_tokens)


@torch.inference_mode()
def measure_length(
    model, n: int, ids_of: IdsOf, args, methods: dict[str, kvsieve.Method], timer: DecodeTimer = timed
) -> list[dict[str, Any]]:
    """Prefill ``ids_of(n)`` for the full cache and every method, then per repetition decode each one and the full
    cache at each method's floor length (a prompt of ``ids_of(length)``): rows with the paired ratios."""
    reserve = args.new_tokens + 8
    start = time.perf_counter()
    caches = build_caches(model, ids_of(n), methods, args.chunk_size, reserve)
    print(f"{n} tokens: prefills done in {time.perf_counter() - start:.0f} s", flush=True)
    decode_ms: dict[str, list[float]] = {name: [] for name in caches}
    attended: dict[str, float | None] = {}
    floors: dict[int, tuple[Driver, torch.Tensor]] = {}
    floor_ms: dict[int, list[float]] = {}
    for rep in range(args.repeats):
        for name, (driver, logits, _) in caches.items():
            ms, att = timer(name, driver, logits, args.new_tokens)
            decode_ms[name].append(ms)
            attended.setdefault(name, att)
        for length in sorted({floor_length(attended[name], args.new_tokens) or n + 1 for name in caches}):
            if length > n:  # nothing decoded, or as long as the prompt: the full cache itself
                continue
            if length not in floors:
                driver = Driver.new(model, "full", length, reserve=reserve)
                floors[length] = (driver, driver.prefill(ids_of(length), args.chunk_size))
            floor_ms.setdefault(length, []).append(timer("floor", *floors[length], args.new_tokens)[0])
        print(f"{n} tokens: repetition {rep + 1}/{args.repeats} done", flush=True)
    rows = []
    full_ms = decode_ms["full"]
    for name, (driver, _, prefill_s) in caches.items():
        ms = decode_ms[name]
        length = floor_length(attended[name], args.new_tokens)
        floor = floor_ms.get(length, [])
        rows.append(
            {
                "tokens": n,
                "method": name,
                "budget": budget_label(None if name == "full" else args.budget),  # as every run directory
                "prefill_s": prefill_s,
                "decode_ms_all": ms,
                "decode_ms": statistics.median(ms),
                "speedup_over_full": statistics.median(f / m for f, m in zip(full_ms, ms)),
                "floor_tokens": length if floor else None,
                "floor_decode_ms": statistics.median(floor) if floor else None,
                "floor_ratio": statistics.median(m / f for m, f in zip(ms, floor)) if floor else None,
                "attended_per_step": attended[name],
                "kv_bytes": driver.cache.kv_bytes(),
                "params": None if name == "full" else methods[name].params(),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| tokens | method | prefill s | decode ms/token (range) | speed-up over full | floor ratio | attended "
        "| KV MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f"{r['decode_ms']:.1f} ({min(r['decode_ms_all']):.1f}-{max(r['decode_ms_all']):.1f})"
        lines.append(
            f"| {r['tokens']} | {r['method']} | {r['prefill_s']:.1f} | {spread} | {r['speedup_over_full']:.2f}x "
            f"| {num(r['floor_ratio'], '.2f')} | {num(r['attended_per_step'], '.0f')} | "
            f"{r['kv_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def read_rows(out: Path | None) -> list[dict[str, Any]]:
    path = None if out is None else out / "rows.jsonl"
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="kvsieve model alias or directory")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated registered method names")
    parser.add_argument("--budget", type=int, default=2048, help="entries per layer and KV head (every method)")
    parser.add_argument("--lengths", default="16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk (every method)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run directory: rows.jsonl, env.json (resumes)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one decode step), got {args.new_tokens}")
    return args


def run(model, tokenizer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every length of ``args.lengths`` not yet in ``args.out``: its rows, appended there as it completes."""
    methods = {name: kvsieve.method(name, budget=args.budget) for name in args.methods.split(",") if name}
    out = None if args.out is None else Path(args.out)
    done = read_rows(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "env.json").write_text(json.dumps({"env": environment(model), "args": vars(args)}, indent=1) + "\n")
    rows = list(done)
    for n in (int(v) for v in args.lengths.split(",")):
        if any(r["tokens"] == n for r in done):
            print(f"{n} tokens: already in {out}/rows.jsonl, skipped", flush=True)
            continue
        new = measure_length(model, n, lambda length: prompt_ids(tokenizer, length), args, methods)
        rows.extend(new)
        if out is not None:
            with (out / "rows.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvsieve.load_model(args.model, dtype=args.dtype)
    print(table(run(model, tokenizer, args)))


if __name__ == "__main__":
    main()
