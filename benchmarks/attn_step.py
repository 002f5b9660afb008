"""Self-attention time per decode step, summed over layers, beside the whole step: where a method's decode differs
from the floor (Full at the method's attended size) when the rest of the step is the same model.

Forward hooks on every layer's ``self_attn`` time its projections, RoPE, cache update and attention. Every run
prefills the bench prompt first; then the runs' greedy steps are interleaved, one step of each per round (the order
rotating), ``--steps`` rounds with the first two dropped, so that a noisy machine's drift falls on all runs alike.
Printed per run: step and self-attention ms (min, median) and, against the first run, the median and min over
rounds of the step-time ratio within a round (the floor ratio when the first run is the floor).

    OMP_NUM_THREADS=1 python benchmarks/attn_step.py --model qwen2.5-coder-0.5b --dtype bfloat16 \\
        --runs full@2056,infllm-2k,infllm-2k:offload=true --length 8192

A run is ``METHOD[:KEY=VALUE...][@PROMPT_TOKENS]``: a registered name or preset, parameters set on it (values read
as YAML), and its prompt's length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.cli.common import parse_param
from kvsieve.driver import Driver


@torch.inference_mode()
def interleaved_times(model, prompts: list[list[int]], methods: list, steps: int, spent: list[float]):
    """Per run, (step seconds, self-attention seconds) of each of ``steps`` greedy decode steps, the runs' steps
    interleaved round by round after every run's prefill."""
    drivers, logits = [], []
    for ids, method in zip(prompts, methods):
        driver = Driver.new(model, method, len(ids), reserve=steps + 8)
        logits.append(driver.prefill(ids))
        drivers.append(driver)
    times: list[list[tuple[float, float]]] = [[] for _ in drivers]
    for step in range(steps):
        for offset in range(len(drivers)):
            run = (step + offset) % len(drivers)
            spent.clear()
            start = time.perf_counter()
            logits[run] = drivers[run].step(int(logits[run][0].argmax()))
            times[run].append((time.perf_counter() - start, sum(spent)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated METHOD[:KEY=VALUE...][@PROMPT_TOKENS]")
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
    runs = args.runs.split(",")
    prompts, methods = [], []
    for run in runs:
        spec, _, length = run.partition("@")
        name, *params = spec.split(":")
        prompts.append(prompt_ids(tok, int(length or args.length)))
        methods.append(kvsieve.method(name, **dict(parse_param(p) for p in params)))
    times = [t[2:] for t in interleaved_times(model, prompts, methods, args.steps, spent)]
    first = [t[0] for t in times[0]]
    for run, run_times in zip(runs, times):
        step, attn = ([1e3 * t[i] for t in run_times] for i in (0, 1))
        ratios = [t[0] / f for t, f in zip(run_times, first)]
        print(
            f"{run:30s} step ms min {min(step):6.1f} median {statistics.median(step):6.1f}   "
            f"self-attention ms min {min(attn):6.1f} median {statistics.median(attn):6.1f}   "
            f"x {runs[0]} median {statistics.median(ratios):.3f} min {min(ratios):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
