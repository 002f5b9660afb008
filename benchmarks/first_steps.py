"""Per-step decode times from copies of prefilled caches: what the first steps after a prefill (or a `Driver.copy`)
cost beside the steady ones, which a short decode's ms/token carries (`long_decode.py` times 16 steps of a copy).

Each run is prefilled once; then ``--copies`` times every run's cache is copied and the copies decode ``--steps``
greedy steps, the runs' steps interleaved (one step of each in turn), so that a noisy machine's drift falls on all
alike. Printed per run: the median over copies of each of the first 8 steps and of the steps after them, and per
copy the ratio of each run's median step to the first run's (the floor ratio when the first run is the floor).

    OMP_NUM_THREADS=1 python benchmarks/first_steps.py --model qwen2.5-coder-0.5b --length 16384 \\
        --runs full@2048,infllm-2k,actqkv-2k
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver

FIRST = 8  # steps reported one by one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="kvsieve model alias or directory (default: the default model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens of a run without @TOKENS")
    parser.add_argument("--runs", default="full@2048,infllm-2k,actqkv-2k", help="METHOD[@PROMPT_TOKENS],...")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help=f"steps per copy (more than {FIRST})")
    args = parser.parse_args()
    if args.steps <= FIRST:
        parser.error(f"--steps must be more than {FIRST}, got {args.steps}")
    torch.set_num_threads(1)
    model, tok = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    runs: dict[str, tuple[Driver, int]] = {}
    with torch.inference_mode():
        for run in args.runs.split(","):
            name, _, tokens = run.partition("@")
            length = int(tokens or args.length)
            driver = Driver.new(model, name, length, reserve=args.steps + 8)
            logits = driver.prefill(prompt_ids(tok, length))
            runs[run] = (driver, int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
        times: dict[str, list[list[float]]] = {run: [] for run in runs}
        for _ in range(args.copies):
            twins = {run: driver.copy() for run, (driver, _) in runs.items()}
            token = {run: first for run, (_, first) in runs.items()}
            per_step: dict[str, list[float]] = {run: [] for run in runs}
            for _ in range(args.steps):
                for run, twin in twins.items():
                    start = time.perf_counter()
                    logits = twin.step(token[run])
                    per_step[run].append(1e3 * (time.perf_counter() - start))
                    token[run] = int(logits[-1].argmax())
            for run in runs:
                times[run].append(per_step[run])
    first_run = next(iter(runs))
    for run, copies in times.items():
        steps = list(zip(*copies))  # per step, one time per copy
        head = " ".join(f"{statistics.median(s):.1f}" for s in steps[:FIRST])
        rest = statistics.median(t for s in steps[FIRST:] for t in s)
        ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(copies, times[first_run])]
        print(f"{run:24s} steps 1-{FIRST} ms: {head} | after: {rest:.1f} | x {first_run} per copy:",
              " ".join(f"{r:.3f}" for r in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
