"""H2O's prefill against the full cache's, on the default model: what its accumulated-attention scoring costs.

For each prompt length the same prompt is prefilled (one chunk, ``logits_to_keep=1``) with kvsieve's full cache and
with H2O, alternating within each repetition so that drift on a shared machine hits both alike; the ratio H2O / full
is taken pair by pair (min, median, max over repetitions). H2O's extra work is the column sums of the attention
(`kvsieve.ops.scored_attention`: one ``Q K^T`` per tile from the attention's own log-sum-exp, the output reused),
then the selection and the gather of the kept entries.

The ratio is explained per length by the ops alone, on random tensors of the model's layer shapes: the attention
(sdpa's causal flash kernel, once per layer) as a share of Full's prefill, and the column sums' cost against the
attention's (`prefix_column_sums` as H2O's default ``gqa_reduce="mean"`` calls it), so that the expected
overhead is ``1 + attention_share * colsum_over_attention`` (plus H2O's selection and gather).

    python benchmarks/bench_h2o_prefill.py --lengths 4096 8192 --repeats 5 --threads 1 --out h2o_prefill.json
    python benchmarks/bench_h2o_prefill.py --dtype bfloat16 --model PATH_OR_NAME --lengths 16384
    python benchmarks/bench_h2o_prefill.py --key-tiles 256 512 --lengths 4096 8192 --threads 1

``--key-tiles T ...`` times H2O at each key tile of the column-sum pass (`kvsieve.ops.scored_attention.KEY_TILE`)
in the same alternation, each paired with the full cache's prefill of its repetition: the in-model comparison of
tiles; the row's ``h2o_s`` and ratios are the first tile's. float32 only: in bfloat16 H2O's column sums on a CPU
take no tiles (`swapped_column_sums`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence

import torch

import kvsieve
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import Phase
from kvsieve.ops import scored_attention
from kvsieve.ops.scored_attention import prefix_column_sums


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--budget", type=float, default=0.2, help="H2O's budget (fraction of the prompt or tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's dtype")
    parser.add_argument("--model", default=None, help="model name or path (default: kvsieve's default model)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--key-tiles",
        type=int,
        nargs="+",
        default=None,
        metavar="T",
        help="keys per tile of H2O's column sums, each timed (default: KEY_TILE)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="write the measurements to this file (JSON)")
    args = parser.parse_args(argv)
    if args.key_tiles and min(args.key_tiles) < 1:
        parser.error(f"--key-tiles: each tile must be a positive number of keys, got {args.key_tiles}")
    if args.key_tiles and args.dtype == "bfloat16":  # `prefix_column_sums`: the swapped flash kernel, no tiles
        parser.error("--key-tiles: H2O's bfloat16 column sums on a CPU use no key tiles; use --dtype float32")
    return args


def prompt_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (1, n), generator=g)


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor, method: kvsieve.Method) -> float:
    cache = SieveCache(model, method.for_prompt(ids.shape[1]))
    start = time.perf_counter()
    with cache.forward_as(Phase.PREFILL_LAST):
        model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache))
    return time.perf_counter() - start


@torch.inference_mode()
def time_ops(model, n: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one layer's causal attention and of its column sums (mean/sum: per KV head), on random
    tensors of the model's shapes and dtype: ``(attention_s, column_sums_s)``."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, heads, n, dim, generator=g).to(dtype)
    keys, values = (torch.randn(1, kv_heads, n, dim, generator=g).to(dtype) for _ in range(2))
    scale = dim**-0.5
    attention_s, sums_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, True, scale=scale)
        attention_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        prefix_column_sums(query, keys, scale, lse, 0, 128, per_query_head=False)
        sums_s.append(time.perf_counter() - start)
    return statistics.median(attention_s), statistics.median(sums_s)


def time_h2o(model, ids: torch.Tensor, h2o: kvsieve.Method, key_tile: int) -> float:
    """H2O's prefill with ``key_tile`` keys per tile of its column sums (the module's tile, restored after)."""
    default = scored_attention.KEY_TILE
    scored_attention.KEY_TILE = key_tile
    try:
        return time_prefill(model, ids, h2o)
    finally:
        scored_attention.KEY_TILE = default


def paired(h2o_s: list[float], full_s: list[float]) -> dict:
    ratios = [h / f for h, f in zip(h2o_s, full_s)]
    return dict(h2o_s=h2o_s, h2o_median_s=statistics.median(h2o_s), ratios=ratios, ratio_min=min(ratios),
                ratio_median=statistics.median(ratios), ratio_max=max(ratios))  # fmt: skip


def run(model, args: argparse.Namespace) -> list[dict]:
    """One row per length: the full cache's and H2O's prefill seconds and their pairwise ratios."""
    full = kvsieve.method("full")
    budget = int(args.budget) if args.budget > 1 else args.budget
    h2o = kvsieve.method("h2o", budget=budget)
    tiles = args.key_tiles or [scored_attention.KEY_TILE]
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for n in args.lengths:
        ids = prompt_ids(n, vocab)
        time_prefill(model, ids[:, : min(n, 256)], h2o)  # warm-up
        full_s, by_tile = [], {t: [] for t in tiles}
        for rep in range(args.repeats):
            runs = [(None, full_s)] + [(t, by_tile[t]) for t in tiles]
            for tile, times in runs if rep % 2 == 0 else runs[::-1]:  # alternate who goes first
                times.append(time_prefill(model, ids, full) if tile is None else time_h2o(model, ids, h2o, tile))
        per_tile = {str(t): paired(by_tile[t], full_s) for t in tiles}
        attention_s, sums_s = time_ops(model, n, args.repeats)
        share = attention_s * model.config.num_hidden_layers / statistics.median(full_s)
        rows.append(
            dict(tokens=n, budget=budget, full_s=full_s, **per_tile[str(tiles[0])],
                 full_median_s=statistics.median(full_s), layer_attention_s=attention_s,
                 layer_column_sums_s=sums_s, attention_share=share,
                 colsum_over_attention=sums_s / attention_s, expected_ratio=1 + share * sums_s / attention_s,
                 key_tiles=per_tile)
        )  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'tokens':>6} {'full s (median)':>15} {'h2o s (median)':>14} {'h2o/full min':>12} "
             f"{'median':>7} {'max':>7} {'attn share':>10} {'colsum/attn':>11} {'expected':>8}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['tokens']:>6} {r['full_median_s']:>15.3f} {r['h2o_median_s']:>14.3f} {r['ratio_min']:>12.3f} "
            f"{r['ratio_median']:>7.3f} {r['ratio_max']:>7.3f} {r['attention_share']:>10.3f} "
            f"{r['colsum_over_attention']:>11.3f} {r['expected_ratio']:>8.3f}"
        )
    return "\n".join(lines)


def tile_table(rows: list[dict]) -> str:
    """H2O / full (min, median, max) per key tile, one line per length."""
    tiles = list(rows[0]["key_tiles"])
    lines = [f"{'tokens':>6} " + " ".join(f"{'tile ' + t + ' min/med/max':>24}" for t in tiles)]
    for r in rows:
        cells = [r["key_tiles"][t] for t in tiles]
        lines.append(f"{r['tokens']:>6} " + " ".join(
            f"{c['ratio_min']:>8.3f}{c['ratio_median']:>8.3f}{c['ratio_max']:>8.3f}" for c in cells))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    rows = run(model, args)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    name = model.config.name_or_path
    print(f"H2O prefill against the full cache, {name} {args.dtype}, {machine}, {args.repeats} repetitions (paired)")
    print(table(rows))
    if len(rows[0]["key_tiles"]) > 1:
        print(tile_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            record = {"machine": machine, "model": name, "dtype": args.dtype, "repeats": args.repeats, "rows": rows}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
