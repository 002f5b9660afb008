"""Decode time per token of RefreshKV against its floor and the full cache, with partial and full steps split out.

RefreshKV keeps the full cache and attends a partial cache of K entries on most steps; its decode time is
``partial_share * t_partial + full_share * t_full``. One run measures every term, methods interleaved ``--repeats``
times (same prompt, greedy, ``stop_at_eos=False``, timed by ``kvsieve.generate``'s clock around each decode forward):

* ``full``: the full cache at the same context (what a full step attends);
* ``floor``: the full cache on a prompt whose decode steps attend ``K + 1`` entries on average (`kvsieve.bench.
  floor_length`): the floor of a partial step;
* ``partial-only`` (``refresh=False``): every decode step partial, ``t_partial``;
* ``full-only`` (fixed schedule, stride 1): every decode step full (attention over C_f plus the rebuild), ``t_full``;
* ``refreshkv`` (query similarity) and ``refreshkv-fixed``: the schedules, with their measured full-step fraction
  and the time the two step kinds predict for it.

    python benchmarks/bench_refreshkv_decode.py --context 4096 --budget 819 --new-tokens 64 --repeats 3
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
from kvsieve.bench import floor_length
from kvsieve.methods.base import resolve_budget

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


DEFAULT_METHODS = ["full", "floor", "partial-only", "full-only", "refreshkv", "refreshkv-fixed"]


def method_list(args) -> list[tuple[str, kvsieve.methods.Method]]:
    common = dict(budget=args.budget, stride=args.stride)
    methods = {
        "full": kvsieve.method("full"),
        "floor": kvsieve.method("full"),  # on the floor's shorter prompt, see `prompt_for`
        "partial-only": kvsieve.method("refreshkv", refresh=False, budget=args.budget),
        "full-only": kvsieve.method("refreshkv", schedule="fixed", stride=1, budget=args.budget),
        "refreshkv": kvsieve.method("refreshkv", threshold=args.threshold, **common),
        "refreshkv-fixed": kvsieve.method("refreshkv", schedule="fixed", **common),
        "refreshkv-norefresh": kvsieve.method("refreshkv", refresh=False, budget=args.budget),
        "snapkv-w1": kvsieve.method("snapkv", budget=args.budget, window_size=1, gqa_reduce="max"),
    }
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    return [(name, methods[name]) for name in args.methods]


def budget_tokens(budget: int | float, context: int) -> int:
    """K for this prompt (an int budget, or a fraction of the prompt as the method resolves it)."""
    return resolve_budget(budget, context)


def prompt_for(name: str, ids: list[int], k: int, n_new: int) -> list[int]:
    """The prompt a method decodes: the floor's is the full-cache prompt whose steps attend ``K + 1`` on average."""
    if name != "floor":
        return ids
    return ids[: floor_length(k + 1, n_new) or k]


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.125, help="K as a fraction of the prompt (or >1: tokens)")
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=None, help="query-similarity threshold (default: model's)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default=None, help="model directory (default: kvsieve's default model)")
    parser.add_argument("--text", default=None, help="text file for the prompt (default: Paradise Lost)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the results here (JSON)")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args(argv)
    if args.budget > 1:
        args.budget = int(args.budget)
    return args


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run(model, tokenizer, ids: list[int], args) -> list[dict]:
    """One row per method: decode ms/token (min/median/max over the repeats), ratios to the floor and to the full
    cache, the measured full-step fraction and, for the schedules, the time the two step kinds predict."""
    methods = method_list(args)
    k = budget_tokens(args.budget, len(ids))
    run_once(model, tokenizer, ids[: min(256, len(ids))], kvsieve.method("full"), 4)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):
        for name, method in methods:
            prompt = prompt_for(name, ids, k, args.new_tokens)
            runs[name].append(run_once(model, tokenizer, prompt, method, args.new_tokens))

    reference = runs["full"][0]["tokens"] if "full" in runs else None
    rows = []
    for name, method in methods:
        first = runs[name][0]
        ms = spread([r["decode_ms_per_token"] for r in runs[name]])
        agree = None  # leading tokens identical to the full cache's (greedy); not meaningful for the floor
        if reference is not None and name != "floor":
            agree = next((i for i, (a, b) in enumerate(zip(first["tokens"], reference)) if a != b), len(reference))
        rows.append(
            {
                "method": name,
                "params": method.params(),
                "prompt_tokens": len(prompt_for(name, ids, k, args.new_tokens)),
                "decode_ms_per_token": ms["median"],
                "decode_ms_spread": ms,
                "decode_ms_all": [r["decode_ms_per_token"] for r in runs[name]],
                "prefill_s": first["prefill_s"],
                "full_fraction": first["full_fraction"],
                "attended_per_step": first["attended_per_step"],
                "kv_mib": first["kv_mib"],
                "same_prefix_as_full": agree,
            }
        )
    by = {r["method"]: r["decode_ms_per_token"] for r in rows}
    for r in rows:
        r["vs_floor"] = r["decode_ms_per_token"] / by["floor"] if "floor" in by else None
        r["vs_full"] = r["decode_ms_per_token"] / by["full"] if "full" in by else None
        # total = partial_share * t_partial + full_share * t_full, from the all-partial and all-full runs
        r["predicted_ms"] = None
        if r["full_fraction"] is not None and "partial-only" in by and "full-only" in by:
            f = r["full_fraction"]
            r["predicted_ms"] = (1 - f) * by["partial-only"] + f * by["full-only"]
    return rows


def print_table(rows: list[dict], header_line: str) -> None:
    print(header_line)
    header = (
        f"{'method':<20} {'prompt':>6} {'ms/tok min':>10} {'median':>7} {'max':>7} {'vs floor':>8} {'vs full':>7} "
        f"{'full steps':>10} {'predicted':>9} {'attended':>9} {'KV MiB':>7} {'same prefix':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = r["decode_ms_spread"]
        vs_floor = "-" if r["vs_floor"] is None else f"{r['vs_floor']:.2f}x"
        vs_full = "-" if r["vs_full"] is None else f"{r['vs_full']:.2f}x"
        frac = "-" if r["full_fraction"] is None else f"{100 * r['full_fraction']:.1f}%"
        predicted = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.1f}"
        agree = "-" if r["same_prefix_as_full"] is None else str(r["same_prefix_as_full"])
        print(
            f"{r['method']:<20} {r['prompt_tokens']:>6} {ms['min']:>10.1f} {ms['median']:>7.1f} {ms['max']:>7.1f} "
            f"{vs_floor:>8} {vs_full:>7} {frac:>10} {predicted:>9} {r['attended_per_step']:>9.0f} "
            f"{r['kv_mib']:>7.1f} {agree:>11}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvsieve.load_model(args.model) if args.model else kvsieve.load_model()
    ids, source = prompt_ids(tokenizer, args.context, args.text)
    rows = run(model, tokenizer, ids, args)
    device = str(next(model.parameters()).device)
    print_table(
        rows,
        f"context {args.context} tokens ({source}), K = {budget_tokens(args.budget, len(ids))}, {args.new_tokens} "
        f"new tokens, repeats {args.repeats}, device {device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
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
