"""Prefill overhead of NACL's scoring and eviction over a plain full prefill, on the default model.

For each prompt length, the same prompt is prefilled (one chunk, ``logits_to_keep=1``) with kvsieve's full cache
and with each NACL configuration, interleaved repetition by repetition so that drift on a shared machine hits
both alike; the ratio NACL / full is taken within the run (min over repetitions, and median). NACL's extra work is
the proxy attention (``p`` proxy queries over all keys, per layer), the selection and the gather into the kept
tensors; the model's own prefill is the same. The plain transformers prefill (``DynamicCache``, sdpa) is timed too,
to show what kvsieve's seam itself costs.

    python benchmarks/bench_nacl_prefill.py --lengths 4096 8192 --repeats 5 --out nacl_prefill.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import DynamicCache

import kvsieve
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs

CONFIGS = {
    "nacl (proxies 1%)": dict(name="nacl", budget=0.2),
    "nacl-paper-20 (proxies 20%)": dict(name="nacl-paper-20"),
}


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor, method: kvsieve.Method | None) -> float:
    cache = DynamicCache(config=model.config) if method is None else SieveCache(model, method)
    start = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the measurements to this file (JSON)")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvsieve.load_model()
    methods = {"full (kvsieve)": kvsieve.method("full")}
    methods.update({label: kvsieve.method(c["name"], **{k: v for k, v in c.items() if k != "name"})
                    for label, c in CONFIGS.items()})  # fmt: skip
    results = []
    for n in args.lengths:
        ids = torch.tensor([prompt_ids(n, len(tok))])
        time_prefill(model, ids[:, :256], methods["full (kvsieve)"])  # warm-up
        times: dict[str, list[float]] = {"plain (DynamicCache)": [], **{label: [] for label in methods}}
        for _ in range(args.repeats):
            times["plain (DynamicCache)"].append(time_prefill(model, ids, None))
            for label, method in methods.items():
                times[label].append(time_prefill(model, ids, method))
        full = times["full (kvsieve)"]
        for label, ts in times.items():
            ratios = [t / f for t, f in zip(ts, full)]
            results.append(
                dict(tokens=n, config=label, min_s=min(ts), median_s=statistics.median(ts),
                     ratio_min=min(ts) / min(full), ratio_median=statistics.median(ratios), times_s=ts)
            )  # fmt: skip
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"NACL prefill overhead, SmolLM2-135M fp32, {machine}, {args.repeats} repetitions")
    print(f"{'tokens':>6}  {'config':<28} {'min s':>7} {'median s':>8} {'min/min':>8} {'median ratio':>12}")
    for r in results:
        print(
            f"{r['tokens']:>6}  {r['config']:<28} {r['min_s']:>7.3f} {r['median_s']:>8.3f} "
            f"{r['ratio_min']:>8.3f} {r['ratio_median']:>12.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "repeats": args.repeats, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
