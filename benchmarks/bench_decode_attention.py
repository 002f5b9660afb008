"""One decode step's attention on a CPU: torch's sdpa (as transformers calls it) against kvsieve's grouped-matmul
path (`kvsieve.ops.attention.decode_attention`), per dtype and number of keys; medians of ``--repeats`` calls.

More columns: ``grouped, slice`` -- the same keys as a slice of a buffer with spare room, as a cache stores them
(strided across heads); ``flash, stacked`` -- torch's CPU flash kernel over that slice with each KV head's query
heads stacked as its queries (``[B, H_kv, g, D]``: GQA without repeated keys, as `kvsieve.ops.merged.attend_with_lse`
calls it for several queries; not kvsieve's decode path); ``window`` -- InfLLM's step over the same number of
entries in its two parts (a 512-entry local window, the rest as one memory part: init tokens, retrieved blocks and
remainder; `kvsieve.ops.merged.merged_attention`), whose ratio to ``grouped`` is its attention's share of the gap
to the floor.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_attention.py --keys 2048 8192 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsieve.ops.attention import decode_attention
from kvsieve.ops.merged import Part, merged_attention

LOCAL = 512  # InfLLM's local window at a 2K budget (infllm-2k)
_flash_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
    print(
        "| keys | dtype | sdpa ms | grouped ms | sdpa / grouped | grouped, slice ms | flash, stacked ms | window ms | "
        "window / grouped |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    g = args.heads // args.kv_heads
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
            stacked = q.reshape(1, args.kv_heads, g, args.head_dim)
            flash = median_ms(
                lambda q=stacked, k=k_room, v=v_room: _flash_for_cpu(q, k, v, 0.0, False, scale=scale), args.repeats
            )
            q_mem = torch.randn_like(q)  # the memory part's own query (rotated at one position)
            local = Part(q, k[:, :, :LOCAL], v[:, :, :LOCAL])
            memory = Part(q_mem, k[:, :, LOCAL:], v[:, :, LOCAL:])
            window = median_ms(lambda a=local, b=memory: merged_attention([a], [b], scale), args.repeats)
            print(
                f"| {n} | {str(dtype).removeprefix('torch.')} | {sdpa:.3f} | {grouped:.3f} | {sdpa / grouped:.1f}x | "
                f"{sliced:.3f} | {flash:.3f} | {window:.3f} | {window / grouped:.2f}x |"
            )


if __name__ == "__main__":
    main()
