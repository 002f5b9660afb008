"""One decode step's attention on a CPU: torch's sdpa (as transformers calls it) against kvsieve's grouped-matmul
path (`kvsieve.ops.attention.decode_attention`), per dtype and number of keys; medians of ``--repeats`` calls.

Two more columns: ``grouped, slice`` -- the same keys as a slice of a buffer with spare room, as a cache stores them
(strided across heads); ``window`` -- InfLLM's step over the same number of entries in three parts (a 512-entry
local window, 80 near-memory entries, the rest as retrieved blocks; `kvsieve.ops.merged.merged_attention`), whose
ratio to ``grouped`` is its attention's share of the gap to the floor.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_attention.py --keys 2048 8192 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsieve.ops.attention import decode_attention
from kvsieve.ops.merged import Part, merged_attention

LOCAL, NEAR = 512, 80  # InfLLM's window at a 2K budget (infllm-2k): 512 local entries, 64 init + a partial block


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=14, help="query heads (Qwen2.5-0.5B: 14)")
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads (Qwen2.5-0.5B: 2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = args.heads // args.kv_heads, True
    scale = args.head_dim**-0.5
    print("| keys | dtype | sdpa ms | grouped ms | sdpa / grouped | grouped, slice ms | window ms | window / grouped |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.keys:
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(1, args.heads, 1, args.head_dim).to(dtype)
            k = torch.randn(1, args.kv_heads, n, args.head_dim).to(dtype)
            v = torch.randn(1, args.kv_heads, n, args.head_dim).to(dtype)
            sdpa = median_ms(
                lambda q=q, k=k, v=v: sdpa_attention_forward(module, q, k, v, None, scaling=scale), args.repeats
            )
            grouped = median_ms(lambda q=q, k=k, v=v: decode_attention(q, k, v, scale), args.repeats)
            k_room, v_room = (torch.cat([t, torch.zeros_like(t)], dim=2)[:, :, :n] for t in (k, v))
            sliced = median_ms(lambda q=q, k=k_room, v=v_room: decode_attention(q, k, v, scale), args.repeats)
            q_mem = torch.randn_like(q)  # the memory parts' own query (rotated at one position)
            cut = (0, LOCAL, LOCAL + NEAR, n)
            parts = [Part(q if a == 0 else q_mem, k[:, :, a:b], v[:, :, a:b]) for a, b in itertools.pairwise(cut)]
            window = median_ms(lambda p=parts: merged_attention(p[:2], p[2:], scale), args.repeats)
            print(
                f"| {n} | {str(dtype).removeprefix('torch.')} | {sdpa:.3f} | {grouped:.3f} | {sdpa / grouped:.1f}x | "
                f"{sliced:.3f} | {window:.3f} | {window / grouped:.2f}x |"
            )


if __name__ == "__main__":
    main()
