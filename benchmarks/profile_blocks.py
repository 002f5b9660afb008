"""Where InfLLM's and ActQKV's time goes: prefill and decode on the bench prompt (default model or --model), profiled.

For each method: one unprofiled warm-up run (its prefill and decode times are printed), then the driver's prefill (the
prompt in one chunk) and the greedy decode steps profiled separately, each by cProfile (Python functions: per-layer
overhead, block scoring, cache bookkeeping) and, unless ``--no-torch-profile``, torch.profiler (tensor ops: matmuls,
exp, copies, gathers, concatenations) on a second run.

    OMP_NUM_THREADS=1 python benchmarks/profile_blocks.py --methods infllm-2k,actqkv-2k --length 4096 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/profile_blocks.py --model qwen2.5-coder-0.5b --dtype bfloat16 \
        --methods infllm-2k --length 16384 --no-torch-profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver


@torch.inference_mode()
def run(model, ids: list[int], method: str, new_tokens: int, prefill_ctx, decode_ctx) -> tuple[float, float]:
    """The driver prefills ``ids`` then decodes ``new_tokens`` greedily under the given contexts; returns (prefill s,
    decode s)."""
    driver = Driver.new(model, method, len(ids), reserve=new_tokens + 8)
    start = time.perf_counter()
    with prefill_ctx:
        logits = driver.prefill(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    with decode_ctx:
        for _ in range(new_tokens):
            logits = driver.step(int(logits[0].argmax()))
    return prefill, time.perf_counter() - start


class Python(contextlib.AbstractContextManager):
    def __init__(self, top: int) -> None:
        self.top, self.profile = top, cProfile.Profile()

    def __enter__(self):
        self.profile.enable()

    def report(self) -> str:
        text = io.StringIO()
        pstats.Stats(self.profile, stream=text).sort_stats("tottime").print_stats(self.top)
        return text.getvalue()

    def __exit__(self, *exc) -> None:
        self.profile.disable()


class Ops(contextlib.AbstractContextManager):
    def __init__(self, top: int) -> None:
        self.top, self.profile = top, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def __enter__(self):
        self.profile.__enter__()

    def report(self) -> str:
        return self.profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.top)

    def __exit__(self, *exc) -> None:
        self.profile.__exit__(*exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="infllm-2k,actqkv-2k")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=30, help="rows of each profile")
    parser.add_argument("--no-torch-profile", action="store_true", help="cProfile only")
    parser.add_argument("--model", default=None, help="kvsieve model alias or directory (default: the default model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    ids = prompt_ids(tok, args.length)
    none = contextlib.nullcontext()
    for method in args.methods.split(","):
        prefill, decode = run(model, ids, method, args.new_tokens, none, none)
        print(f"\n## {method} at {args.length} tokens")
        print(f"unprofiled: prefill {prefill:.2f} s, decode {1000 * decode / args.new_tokens:.1f} ms/token")
        kinds = [Python] if args.no_torch_profile else [Python, Ops]
        for kind in kinds:
            pre, dec = kind(args.top), kind(args.top)
            run(model, ids, method, args.new_tokens, pre, dec)
            print(f"\n### {kind.__name__}: prefill\n{pre.report()}\n### {kind.__name__}: decode\n{dec.report()}")


if __name__ == "__main__":
    main()
