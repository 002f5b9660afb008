"""One InfLLM prefill window's attention on a CPU (`kvsieve.ops.merged.merged_attention`) against the number of
queries per tile: ``untiled`` takes the whole window as one tile (every logit of the window materialised at once,
as before tiling); the others, ``--tiles`` queries at a time. Parts as `kvsieve.methods.infllm` builds them for a
window after the first: the local part (a band ``n_local`` wide along the diagonal), the near memory (init tokens
and a remainder whose visible prefix grows by one key per query) and the retrieved blocks (fused: every key seen
by every query). Medians of ``--repeats`` calls, with the min and max.

    OMP_NUM_THREADS=1 python benchmarks/bench_window_attention.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvsieve.ops.merged import Band, Part, merged_attention


def timings_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def window_parts(args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Part], list[Part]]:
    """The parts of one window of ``args.window`` queries, ``n_local`` local keys before it."""
    b, h, h_kv, d, w, n_local = 1, args.heads, args.kv_heads, args.head_dim, args.window, args.n_local

    def tensors(n: int, heads: int) -> torch.Tensor:
        return torch.randn(b, heads, n, d).to(dtype)

    first = n_local - 1  # the window's first query sees n_local - 1 keys before it and itself
    local_keys = n_local + w - 1
    local = Part(
        tensors(w, h), tensors(local_keys, h_kv), tensors(local_keys, h_kv), Band(first - n_local + 1, first + 1)
    )
    near_keys = args.init + args.remainder
    # the remainder's keys come into view one per query, starting a third of the way through the window
    q_mem = tensors(w, h)  # the memory's queries (one angle), shared by the near part and the blocks, as InfLLM's
    near = Part(q_mem, tensors(near_keys, h_kv), tensors(near_keys, h_kv), Band(hi=args.init - w // 3, floor=args.init))
    block_keys = args.blocks * args.block_size
    blocks = Part(q_mem, tensors(block_keys, h_kv), tensors(block_keys, h_kv))
    return [local, near], [blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256, help="queries per window (infllm-2k's exc_block_size)")
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--init", type=int, default=64, help="init (sink) tokens")
    parser.add_argument("--remainder", type=int, default=300, help="keys not yet in a block")
    parser.add_argument("--blocks", type=int, default=46, help="retrieved blocks (infllm-2k: 46)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.head_dim**-0.5
    tiles = [("untiled", args.window)] + [(str(t), t) for t in args.tiles]
    print("| dtype | queries per tile | ms (median) | min | max | / untiled | max abs diff to untiled |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        scored, fused = window_parts(args, dtype)
        reference, _ = merged_attention(scored, fused, scale, query_tile=args.window)
        base = None
        for name, tile in tiles:
            times = timings_ms(
                lambda t=tile, s=scored, f=fused: merged_attention(s, f, scale, query_tile=t), args.repeats
            )
            median = statistics.median(times)
            base = base or median
            out, _ = merged_attention(scored, fused, scale, query_tile=tile)
            diff = (out.float() - reference.float()).abs().max().item()
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {median:.2f} | {min(times):.2f} | {max(times):.2f} "
                f"| {median / base:.2f}x | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
