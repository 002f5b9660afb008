"""Prefill time against prompt length for InfLLM and ActQKV at a 2K budget (the default model).

Both methods attend a bounded number of entries per query (init + window + top-k blocks), so prefill time must
grow linearly with the prompt: the target is time(32K) / time(8K) <= 4.5. ActQKV adds the activation statistics,
cosine scores and the entropy split on top of InfLLM's retrieval: the target is ActQKV within 1.15x of InfLLM.

    python benchmarks/bench_infllm_prefill.py --lengths 8192 16384 32768 --json out.json

Prompts are InfiniteBench-style passkey text (noise lines, a needle in the middle), fed in model-level chunks of
``--chunk-size`` tokens; the time is kvsieve's measured ``prefill_s``, the best of ``--repeats`` runs with the
methods interleaved (on a shared machine, load then hits every method alike).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import kvsieve

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    noise = tokenizer(NOISE, add_special_tokens=False)["input_ids"]
    needle = tokenizer("The pass key is 71432. Remember it. 71432 is the pass key.\n", add_special_tokens=False)[
        "input_ids"
    ]
    half = (n_tokens - len(needle)) // 2
    body = (noise * (n_tokens // len(noise) + 1))[:half] + needle
    return (body + noise * (n_tokens // len(noise) + 1))[:n_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["infllm-2k", "actqkv-2k"])
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = kvsieve.load_model()
    rows = []
    for n in args.lengths:
        ids = prompt_ids(tok, n)
        best: dict[str, float] = {}
        last = {}
        for _ in range(args.repeats):  # methods interleaved, so that load on a shared machine hits both alike
            for name in args.methods:
                out = kvsieve.generate(model, tok, ids, method=name, max_new_tokens=1, chunk_size=args.chunk_size)
                best[name] = min(best.get(name, float("inf")), out.stats.prefill_s)
                last[name] = out
        for name in args.methods:
            out = last[name]
            rows.append(
                {
                    "method": name,
                    "tokens": n,
                    "prefill_s": best[name],
                    "tokens_per_s": n / best[name],
                    "host_blocks": out.stats.layers[0].get("host_blocks"),
                    "device_bytes": out.stats.kv_bytes,
                    "host_bytes": sum(entry.get("host_bytes", 0) for entry in out.stats.layers),
                }
            )
            print(f"{name:>12} {n:>7} tokens  prefill {best[name]:8.2f} s  {n / best[name]:8.1f} tok/s", flush=True)

    def time_of(method: str, n: int) -> float | None:
        return next((r["prefill_s"] for r in rows if r["method"] == method and r["tokens"] == n), None)

    print(f"\n{'method':>12} {'tokens':>7} {'prefill s':>10} {'x first':>8} {'vs ' + args.methods[0]:>14}")
    first_n = min(args.lengths)
    checks = {}
    for r in rows:
        base = time_of(r["method"], first_n)
        ref = time_of(args.methods[0], r["tokens"])
        growth = r["prefill_s"] / base
        r["growth_vs_first"] = growth
        r["vs_first_method"] = r["prefill_s"] / ref
        print(f"{r['method']:>12} {r['tokens']:>7} {r['prefill_s']:10.2f} {growth:8.2f} {r['vs_first_method']:14.2f}")
    last_n = max(args.lengths)
    for name in args.methods:
        if last_n != first_n:
            ratio = time_of(name, last_n) / time_of(name, first_n)
            limit = 1.125 * last_n / first_n  # 4.5 for 32K / 8K
            checks[f"{name} time({last_n})/time({first_n}) = {ratio:.2f} <= {limit:.2f}"] = ratio <= limit
    for name in args.methods[1:]:
        for n in args.lengths:
            ratio = time_of(name, n) / time_of(args.methods[0], n)
            checks[f"{name}/{args.methods[0]} at {n} = {ratio:.2f} <= 1.15"] = ratio <= 1.15
    print()
    for text, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + text)
    if args.json:
        meta = {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "checks": checks}, f, indent=2)


if __name__ == "__main__":
    main()
