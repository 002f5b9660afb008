"""Torch ops dispatched per decode step, per method, beside the full cache's: the per-step host work, without noise.

A decode step of a small model is dominated by dispatch: each top-level ``aten::`` op costs a few microseconds on
a CPU whatever its size, and on a GPU it is a kernel launch (the H200 run of docs/results/gpu_decode.md was
host-bound at 15% of the HBM bandwidth). Timings on a shared machine vary by +-20% from one repetition to the next;
the count of ops a step dispatches does not vary at all, so it shows what a change to a method's per-step code
removed. For each method: a prefill of the bench prompt (``--length`` tokens), three warm-up steps, then
``--steps`` greedy steps under ``torch.profiler``; the ops with no parent op are counted and divided by the
``steps - 1`` decode forwards (the first token is the prefill's), and the most frequent are listed per layer.

    OMP_NUM_THREADS=1 python benchmarks/op_counts.py --methods streamingllm,h2o,infllm-2k,actqkv-2k --length 4096
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver
from kvsieve.generate import decode


@torch.inference_mode()
def count(model, ids: list[int], method: str, steps: int) -> collections.Counter:
    """Top-level ``aten::`` ops of ``steps`` greedy decode steps (after three warm-up steps on another copy)."""
    driver = Driver.new(model, method, len(ids), reserve=steps + 8)
    logits = driver.prefill(ids)
    decode(driver.copy(), logits, 3)
    twin = driver.copy()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(twin, logits, steps)
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="kvsieve model alias or directory (default: the default)")
    parser.add_argument("--methods", default="streamingllm,h2o,infllm-2k,actqkv-2k", help="comma-separated methods")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=9, help="profiled decode steps (the first is the prefill's)")
    parser.add_argument("--top", type=int, default=12, help="ops listed per method")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the counts here (JSON)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (one decode forward), got {args.steps}")
    torch.set_num_threads(1)
    model, tokenizer = kvsieve.load_model(args.model, dtype="float32")
    ids = prompt_ids(tokenizer, args.length)
    layers = model.config.num_hidden_layers
    forwards = args.steps - 1
    rows = []
    for method in ["full", *(m for m in args.methods.split(",") if m and m != "full")]:
        ops = count(model, ids, method, args.steps)
        rows.append({"method": method, "ops_per_step": sum(ops.values()) / forwards, "ops": dict(ops)})
    full = rows[0]["ops_per_step"]
    print("| method | ops per step | x full | ops per layer above full's | most frequent, per layer and step |")
    print("|---|---|---|---|---|")
    for row in rows:
        ops = collections.Counter(row["ops"])
        common = ", ".join(f"{name[6:]} {n / forwards / layers:.1f}" for name, n in ops.most_common(args.top))
        per_step = row["ops_per_step"]
        above = (per_step - full) / layers
        print(f"| {row['method']} | {per_step:.0f} | {per_step / full:.2f} | {above:.0f} | {common} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "forwards": forwards, "layers": layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
