"""H2O's prefill scoring: the column sums beside sdpa's flash kernel, the two ways kvsieve computes them and one that
was tried and not adopted, at SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, head dim 64), causal.

* ``flash``: sdpa's CPU flash kernel alone (the full cache's attention; the floor of any scoring);
* ``flash + column sums`` (`kvsieve.ops.scored_attention.causal_column_sums`, H2O's path in float32): the
  kernel's output and log-sum-exp, then one ``Q K^T`` and an exponential per visible logit, tile by tile;
* ``one pass``: output and column sums from one pass of torch ops per block of queries (logits, softmax, ``P V``,
  the probabilities summed over the block's rows): one ``Q K^T`` fewer, but torch's matmuls and elementwise
  passes over a block's full rows are slower than the fused kernel's cache-sized tiles;
* ``swapped flash`` (`kvsieve.ops.scored_attention.swapped_column_sums`, H2O's path in bfloat16 on a CPU): the
  column sums as the log-sum-exp of a second flash call with keys and queries swapped (a key's column sum is
  ``exp(logsumexp_i(q_i . k_j * scale - lse_i))``; ``- lse_i / scale`` folded in as two more head dimensions, the
  causal mask flipped by reversing both sequences): a whole second attention, whose exponentials the kernel
  fuses with its sums -- slower than the tiles in float32, faster in bfloat16 with AMX.

Prints the median seconds of each and its ratio to ``flash``, with the largest difference of the alternatives'
output and column sums (divided by the length) from the adopted path's. The prefill ratio H2O / Full is about
``1 + share x (ratio - 1)``, ``share`` the attention's share of Full's prefill (0.35 at 4K, 0.57 at 8K in fp32,
docs/results/speed.md): 1.10x at 8K needs ``ratio <= 1.18``.

    OMP_NUM_THREADS=1 python benchmarks/bench_h2o_scoring_kernels.py --lengths 4096 8192 --repeats 3 --threads 1

``--one-pass-blocks B ...`` times the one pass at each block of queries (128 by default; smaller blocks keep a
block's rows over all keys in a smaller cache). ``--key-tiles T ...`` times the column sums alone at each key
tile (the grid that set `KEY_TILE`); ``--heads`` and ``--kv-heads`` set other attention shapes (Qwen2.5-0.5B: 14 and 2):

    OMP_NUM_THREADS=1 python benchmarks/bench_h2o_scoring_kernels.py --lengths 8192 --key-tiles 256 512 1024 \\
        --dtype bfloat16 --heads 14 --kv-heads 2

``--pieces`` (float32) times one tile of the column sums piece by piece (its ``Q K^T``, exponential, sum over the
queries) and the matmul rate of the tile, of a large square matmul (the machine's float32 peak as torch reaches
it) and of the flash kernel, then per length the column sums predicted from the tile's pieces and their floor (the
``Q K^T`` alone at the peak rate) against the flash kernel, beside the measured ratio: where the float32 pass
stands against the least it can cost.

    OMP_NUM_THREADS=1 python benchmarks/bench_h2o_scoring_kernels.py --lengths 4096 8192 --pieces
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from kvsieve.ops.scored_attention import KEY_TILE, _flash_for_cpu, causal_column_sums, swapped_column_sums

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def one_pass(q, k, v, scale, block=128):
    """Output ``[B, H, n, D]`` and per-KV-head column sums ``[B, H_kv, n]`` from one pass per block of queries."""
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    out = torch.empty(b, h_kv, g, n, d, dtype=q.dtype)
    total = torch.zeros(b, h_kv, n, dtype=torch.float32)
    future = torch.ones(block, block, dtype=torch.bool).triu_(1)
    keys_t = k.transpose(-1, -2)
    for start in range(0, n, block):
        stop = min(n, start + block)
        m = stop - start
        rows = (q[:, :, start:stop] * scale).reshape(b, h_kv, g * m, d)
        logits = torch.matmul(rows, keys_t[..., :stop]).float()  # [B, H_kv, g * m, stop]
        logits.view(b, h_kv, g, m, stop)[..., start:stop].masked_fill_(future[:m, :m], -torch.inf)
        probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        probs.mul_(probs.sum(-1, keepdim=True).reciprocal_())
        out[:, :, :, start:stop] = torch.matmul(probs.to(v.dtype), v[:, :, :stop]).view(b, h_kv, g, m, d)
        total[..., :stop] += probs.sum(-2)
    return out.view(b, h, n, d), total


def variants(q, k, v, scale, blocks=(128,)):
    """The computations timed, as callables: flash, flash + column sums, one pass per query block in ``blocks``,
    flash + swapped flash."""

    def flash():
        return _flash_for_cpu(q, k, v, 0.0, True, scale=scale)

    return (
        flash,
        lambda: causal_column_sums(q, k, scale, flash()[1], 0, 128, per_query_head=False),
        *(partial(one_pass, q, k, v, scale, block) for block in blocks),
        lambda: swapped_column_sums(q, k, scale, flash()[1], 0, per_query_head=False),
    )


def random_attention(args: argparse.Namespace, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Query ``[1, heads, n, D]``, keys and values ``[1, kv_heads, n, D]``, seeded by ``n``."""
    gen = torch.Generator().manual_seed(n)
    return tuple(
        torch.randn(1, heads, n, HEAD_DIM, generator=gen).to(dtype)
        for heads in (args.heads, args.kv_heads, args.kv_heads)
    )


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tile_grid(args: argparse.Namespace) -> None:
    """The column sums alone (``lse`` given, H2O's ``gqa_reduce="mean"`` call) at each key tile, against flash."""
    torch.set_num_threads(args.threads)
    dtype, scale = getattr(torch, args.dtype), HEAD_DIM**-0.5
    print("| tokens | flash s | " + " | ".join(f"column sums / flash, {t}-key tiles" for t in args.key_tiles) + " |")
    print("|---:|---:|" + "---:|" * len(args.key_tiles))
    for n in args.lengths:
        q, k, v = random_attention(args, n, dtype)
        flash = median_seconds(partial(_flash_for_cpu, q, k, v, 0.0, True, scale=scale), args.repeats)
        lse = _flash_for_cpu(q, k, v, 0.0, True, scale=scale)[1]
        ratios = [
            median_seconds(partial(causal_column_sums, q, k, scale, lse, 0, 128, False, t), args.repeats) / flash
            for t in args.key_tiles
        ]
        print(f"| {n:,} | {flash:.3f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


def per_call_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn``, the least of five loops of ``calls`` after a warm-up."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def tile_pieces(args: argparse.Namespace) -> None:
    """float32: one tile of `causal_column_sums` (a block of 128 queries x `KEY_TILE` keys, every KV head in one
    batched matmul) piece by piece, and the column sums predicted from it against the flash kernel."""
    torch.set_num_threads(args.threads)
    block, h_kv, g, d = 128, args.kv_heads, args.heads // args.kv_heads, HEAD_DIM + 1  # + 1: the folded -lse
    rows, tile = torch.randn(h_kv, g * block, d), torch.randn(h_kv, d, KEY_TILE) * 0.1
    unused, logits, probs = (
        torch.zeros(()),
        torch.empty(h_kv, g * block, KEY_TILE),
        torch.empty(h_kv, g * block, KEY_TILE),
    )
    total = torch.zeros(h_kv, g, KEY_TILE)
    pieces = {  # the exponential into a buffer of its own: in place, repeated, it would overflow (inf is slow)
        "Q K^T (baddbmm)": lambda: torch.baddbmm(unused, rows, tile, beta=0, alpha=0.125, out=logits),
        "exponential": lambda: torch.exp(logits, out=probs),
        "sum over the queries": lambda: total.add_(probs.view(h_kv, g, block, KEY_TILE).sum(dim=2)),
    }
    us = {name: per_call_us(fn) for name, fn in pieces.items()}
    tile_us = sum(us.values())
    tile_rate = 2 * rows.numel() * KEY_TILE / us["Q K^T (baddbmm)"] / 1e3  # GFLOP/s
    square = torch.randn(1024, 1024)
    peak = 2 * 1024**3 / per_call_us(lambda: square @ square, calls=10) / 1e3
    print("| piece of one tile | us | share |\n|---|---:|---:|")
    for name, t in us.items():
        print(f"| {name} | {t:.1f} | {t / tile_us:.2f} |")
    print(f"\nmatmul rate, GFLOP/s: the tile's Q K^T {tile_rate:.0f}, a 1024^3 matmul {peak:.0f}")
    head = "column sums / flash: measured | from the pieces | floor (Q K^T at peak)"
    print(f"\n| tokens | flash s | flash GFLOP/s | {head} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        q, k, v = random_attention(args, n, torch.float32)
        flash = median_seconds(partial(_flash_for_cpu, q, k, v, 0.0, True, scale=HEAD_DIM**-0.5), args.repeats)
        lse = _flash_for_cpu(q, k, v, 0.0, True, scale=HEAD_DIM**-0.5)[1]
        sums = partial(causal_column_sums, q, k, HEAD_DIM**-0.5, lse, 0, block, False)
        measured = median_seconds(sums, args.repeats)
        keys = sum(min(n, start + block) for start in range(0, n, block))  # key columns the tiles cover, all blocks
        visible = n * (n + 1) / 2 * args.heads  # logits a causal pass computes
        flash_rate = 4 * visible * HEAD_DIM / flash / 1e9  # Q K^T and P V
        predicted = tile_us * 1e-6 * keys / KEY_TILE
        floor = 2 * keys * g * block * h_kv * d / (peak * 1e9)
        print(
            f"| {n:,} | {flash:.3f} | {flash_rate:.0f} | {measured / flash:.2f} | {predicted / flash:.2f} "
            f"| {floor / flash:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="tensor dtype")
    parser.add_argument(
        "--key-tiles", type=int, nargs="+", default=None, help="time only the column sums at these key tiles instead"
    )
    parser.add_argument("--heads", type=int, default=HEADS, help="query heads (Qwen2.5-0.5B: 14)")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS, help="KV heads (Qwen2.5-0.5B: 2)")
    parser.add_argument(
        "--one-pass-blocks", type=int, nargs="+", default=[128], metavar="B", help="queries per block of one pass"
    )
    parser.add_argument("--pieces", action="store_true", help="float32: one tile's pieces and the pass's floor instead")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.lengths) < 1 or min(args.key_tiles or [1]) < 1 or min(args.one_pass_blocks) < 1:
        parser.error("--repeats, --lengths, --key-tiles and --one-pass-blocks must be >= 1")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error("--heads must be a positive multiple of --kv-heads")
    if args.pieces and (args.key_tiles or args.dtype != "float32"):
        parser.error("--pieces times the float32 tiles: it takes neither --key-tiles nor --dtype bfloat16")
    if args.key_tiles:
        tile_grid(args)
        return
    if args.pieces:
        tile_pieces(args)
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scale = HEAD_DIM**-0.5
    blocks = args.one_pass_blocks
    passes = " | ".join(f"one pass, {block} queries" for block in blocks)
    print(f"| tokens | flash s | flash + column sums | {passes} | flash + swapped flash | max diff: one pass, swap |")
    print("|---:|---:|---:|" + "---:|" * len(blocks) + "---:|---|")
    for n in args.lengths:
        q, k, v = random_attention(args, n, dtype)
        out, lse = _flash_for_cpu(q, k, v, 0.0, True, scale=scale)
        sums = causal_column_sums(q, k, scale, lse, 0, 128, per_query_head=True)  # [B, H, n]
        fused_out, fused_sums = one_pass(q, k, v, scale, blocks[0])
        diff_pass = max(
            (fused_out.float() - out.float()).abs().max().item(),
            (fused_sums - sums.view(1, args.kv_heads, -1, n).sum(2)).abs().max().item() / n,
        )
        diff_swapped = (swapped_column_sums(q, k, scale, lse, 0) - sums).abs().max().item() / n
        flash, adopted, *fused, swapped = (median_seconds(fn, args.repeats) for fn in variants(q, k, v, scale, blocks))
        cells = [f"{t:.3f} ({t / flash:.2f}x)" for t in (adopted, *fused, swapped)]
        print(f"| {n:,} | {flash:.3f} | " + " | ".join(cells) + f" | {diff_pass:.1e}, {diff_swapped:.1e} |")


if __name__ == "__main__":
    main()
