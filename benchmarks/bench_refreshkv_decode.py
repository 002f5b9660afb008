"""Decode time per token of RefreshKV against the full cache at the same context, in one run.

RefreshKV keeps the full cache and attends a partial cache of K entries on most steps; the fraction of full steps
(measured per layer, averaged) is what its decode time depends on. Every method decodes the same prompt greedily
(teacher-free, ``stop_at_eos=False``) and is timed by ``kvsieve.generate``'s clock around each decode forward.
Methods run interleaved ``--repeats`` times; the table shows the median decode time per token.

    python benchmarks/bench_refreshkv_decode.py --context 4096 --new-tokens 64 --out runs/refreshkv_decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

import kvsieve

TEXT_FILE = "milton_paradise_lost.txt"  # public domain, shipped in kvsieve/data
SKIP_CHARS = 20_000  # start inside the poem, past the title and the argument


def prompt_ids(tokenizer, n_tokens: int, text_path: str | None) -> tuple[list[int], str]:
    """``n_tokens`` token ids of public-domain text (repeated if too short) and a label for the source."""
    if text_path:
        text, label = Path(text_path).read_text(), text_path
    else:
        source = resources.files("kvsieve") / "data" / TEXT_FILE
        if not source.is_file():
            raise SystemExit(f"kvsieve/data/{TEXT_FILE} not found: pass --text FILE")
        text, label = source.read_text()[SKIP_CHARS:], f"kvsieve/data/{TEXT_FILE}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens], label


def method_list(args) -> list[tuple[str, kvsieve.methods.Method]]:
    common = dict(budget=args.budget, stride=args.stride)
    methods = {
        "full": kvsieve.method("full"),
        "refreshkv": kvsieve.method("refreshkv", threshold=args.threshold, **common),
        "refreshkv-fixed": kvsieve.method("refreshkv", schedule="fixed", **common),
        "refreshkv-norefresh": kvsieve.method("refreshkv", refresh=False, budget=args.budget),
        "snapkv-w1": kvsieve.method("snapkv", budget=args.budget, window_size=1, gqa_reduce="max"),
    }
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    return [(name, methods[name]) for name in args.methods]


def run_once(model, tokenizer, ids, method, n_new: int) -> dict:
    out = kvsieve.generate(model, tokenizer, ids, method=method, max_new_tokens=n_new, stop_at_eos=False)
    layers = out.stats.layers
    fractions = [layer["full_fraction"] for layer in layers if layer.get("full_fraction") is not None]
    return {
        "tokens": out.tokens,
        "decode_ms_per_token": 1000 * out.stats.decode_s_per_token,
        "prefill_s": out.stats.prefill_s,
        "full_fraction": sum(fractions) / len(fractions) if fractions else None,
        "attended_per_step": out.stats.attended_per_step,
        "kv_mib": out.stats.kv_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.125, help="K as a fraction of the prompt (or >1: tokens)")
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=None, help="query-similarity threshold (default: model's)")
    parser.add_argument("--methods", nargs="+", default=["full", "refreshkv", "refreshkv-fixed"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default=None, help="model directory (default: kvsieve's default model)")
    parser.add_argument("--text", default=None, help="text file for the prompt (default: Paradise Lost)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the results here (JSON)")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args()
    if args.budget > 1:
        args.budget = int(args.budget)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = kvsieve.load_model(args.model) if args.model else kvsieve.load_model()
    ids, source = prompt_ids(tokenizer, args.context, args.text)
    methods = method_list(args)
    run_once(model, tokenizer, ids[:256], kvsieve.method("full"), 4)  # warm-up

    runs: dict[str, list[dict]] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):
        for name, method in methods:
            runs[name].append(run_once(model, tokenizer, ids, method, args.new_tokens))

    reference = runs["full"][0]["tokens"] if "full" in runs else None
    rows = []
    for name, method in methods:
        first = runs[name][0]
        ms = statistics.median(r["decode_ms_per_token"] for r in runs[name])
        agree = None  # leading tokens identical to the full cache's (greedy)
        if reference is not None:
            agree = next((i for i, (a, b) in enumerate(zip(first["tokens"], reference)) if a != b), len(reference))
        rows.append(
            {
                "method": name,
                "params": method.params(),
                "decode_ms_per_token": ms,
                "decode_ms_all": [r["decode_ms_per_token"] for r in runs[name]],
                "prefill_s": first["prefill_s"],
                "full_fraction": first["full_fraction"],
                "attended_per_step": first["attended_per_step"],
                "kv_mib": first["kv_mib"],
                "same_prefix_as_full": agree,
            }
        )
    device = str(next(model.parameters()).device)
    print(
        f"context {args.context} tokens ({source}), {args.new_tokens} new tokens, repeats {args.repeats}, "
        f"device {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    header = (
        f"{'method':<20} {'decode ms/tok':>13} {'vs full':>8} {'full steps':>10} {'attended':>9} {'KV MiB':>7} "
        f"{'same prefix':>11}"
    )
    print(header)
    print("-" * len(header))
    base = next((r["decode_ms_per_token"] for r in rows if r["method"] == "full"), None)
    for r in rows:
        ratio = f"{r['decode_ms_per_token'] / base:.2f}x" if base else "-"
        frac = "-" if r["full_fraction"] is None else f"{100 * r['full_fraction']:.1f}%"
        agree = "-" if r["same_prefix_as_full"] is None else str(r["same_prefix_as_full"])
        print(
            f"{r['method']:<20} {r['decode_ms_per_token']:>13.1f} {ratio:>8} {frac:>10} "
            f"{r['attended_per_step']:>9.0f} {r['kv_mib']:>7.1f} {agree:>11}"
        )
    if args.out:
        result = {
            "args": vars(args),
            "source": source,
            "device": device,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
