"""Self-attention time per decode step, summed over layers, beside the whole step: where a method's decode differs
from the floor (Full at the method's attended size) when the rest of the step is the same model.

Forward hooks on every layer's ``self_attn`` time its projections, RoPE, cache update and attention; methods run
one after the other on the bench prompt, ``--steps`` greedy steps each (the first two dropped), min and median.

    OMP_NUM_THREADS=1 python benchmarks/attn_step.py --model qwen2.5-coder-0.5b --dtype bfloat16 \\
        --runs full@2056,infllm-2k,full@2056,infllm-2k --length 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver


@torch.inference_mode()
def decode_times(model, ids: list[int], method: str, steps: int, spent: list[float]) -> list[tuple[float, float]]:
    """(step seconds, self-attention seconds) of each greedy decode step after the driver prefills ``ids``."""
    driver = Driver.new(model, method, len(ids), reserve=steps + 8)
    logits = driver.prefill(ids)
    times = []
    for _ in range(steps):
        spent.clear()
        start = time.perf_counter()
        logits = driver.step(int(logits[0].argmax()))
        times.append((time.perf_counter() - start, sum(spent)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated METHOD or METHOD@PROMPT_TOKENS")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens of a run without @")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are dropped)")
    torch.set_num_threads(args.threads)
    model, tok = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    spent: list[float] = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda mod, *_: setattr(mod, "_t0", time.perf_counter()))
        layer.self_attn.register_forward_hook(lambda mod, *_: spent.append(time.perf_counter() - mod._t0))
    for run in args.runs.split(","):
        method, _, length = run.partition("@")
        times = decode_times(model, prompt_ids(tok, int(length or args.length)), method, args.steps, spent)[2:]
        step, attn = ([1e3 * t[i] for t in times] for i in (0, 1))
        print(
            f"{run:22s} step ms min {min(step):6.1f} median {statistics.median(step):6.1f}   "
            f"self-attention ms min {min(attn):6.1f} median {statistics.median(attn):6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
