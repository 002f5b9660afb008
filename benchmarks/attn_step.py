"""Self-attention time per decode step, summed over layers, beside the whole step: where a method's decode differs
from the floor (Full at the method's attended size) when the rest of the step is the same model.

Forward hooks on every layer's ``self_attn`` time its projections, RoPE, cache update and attention. Every run
prefills the bench prompt first; then the runs' greedy steps are interleaved, one step of each per round (the order
rotating), ``--steps`` rounds with the first two dropped, so that a noisy machine's drift falls on all runs alike.
Printed per run: step and self-attention ms (min, median) and, against the first run, the median and min over
rounds of the step-time ratio within a round (the floor ratio when the first run is the floor).
``--prefill-repeats R`` first times R prefills of every run the same way (rounds, rotating order) and prints each
run's prefill seconds and its ratio to the first run's within a round (two variants of one method, say).

    OMP_NUM_THREADS=1 python benchmarks/attn_step.py --model qwen2.5-coder-0.5b --dtype bfloat16 \\
        --runs full@2056,infllm-2k,infllm-2k:offload=true --length 8192
    OMP_NUM_THREADS=1 python benchmarks/attn_step.py --runs infllm-2k,infllm-2k:offload=true --prefill-repeats 4

A run is ``METHOD[:KEY=VALUE...][@PROMPT_TOKENS]``: a registered name or preset, parameters set on it (values read
as YAML), and its prompt's length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.cli.common import parse_param
from kvsieve.driver import Driver
from kvsieve.methods.base import Method


def parse_run(run: str, length: int) -> tuple[Method, int]:
    """``METHOD[:KEY=VALUE...][@PROMPT_TOKENS]`` -> the method and its prompt length (``length`` without ``@``)."""
    spec, _, tokens = run.partition("@")
    name, *params = spec.split(":")
    return kvsieve.method(name, **dict(parse_param(p) for p in params)), int(tokens or length)


def rounds(n_runs: int, n_rounds: int):
    """``(round, run)`` pairs: every run once per round, the order rotating from round to round."""
    for r in range(n_rounds):
        for offset in range(n_runs):
            yield r, (r + offset) % n_runs


@torch.inference_mode()
def interleaved_prefills(model, prompts: list[list[int]], methods: list[Method], repeats: int) -> list[list[float]]:
    """Per run, the seconds of each of ``repeats`` prefills of its prompt (a fresh cache each), interleaved."""
    times: list[list[float]] = [[] for _ in methods]
    for _, run in rounds(len(methods), repeats):
        driver = Driver.new(model, methods[run], len(prompts[run]), reserve=8)
        start = time.perf_counter()
        driver.prefill(prompts[run])
        times[run].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def interleaved_times(model, prompts: list[list[int]], methods: list[Method], steps: int, spent: list[float]):
    """Per run, (step seconds, self-attention seconds) of each of ``steps`` greedy decode steps, the runs' steps
    interleaved round by round after every run's prefill."""
    drivers, logits = [], []
    for ids, method in zip(prompts, methods):
        driver = Driver.new(model, method, len(ids), reserve=steps + 8)
        logits.append(driver.prefill(ids))
        drivers.append(driver)
    times: list[list[tuple[float, float]]] = [[] for _ in drivers]
    for _, run in rounds(len(drivers), steps):
        spent.clear()
        start = time.perf_counter()
        logits[run] = drivers[run].step(int(logits[run][0].argmax()))
        times[run].append((time.perf_counter() - start, sum(spent)))
    return times


def ratio_line(label: str, seconds: Sequence[float], first: Sequence[float], what: str, unit_scale: float) -> str:
    """``label``: min and median of ``seconds`` (times ``unit_scale``) and of their ratio to ``first``, pair by pair."""
    ratios = [s / f for s, f in zip(seconds, first)]
    values = [unit_scale * s for s in seconds]
    return f"{label:30s} {what} min {min(values):7.2f} median {statistics.median(values):7.2f}   " + (
        f"x first median {statistics.median(ratios):.3f} min {min(ratios):.3f} max {max(ratios):.3f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated METHOD[:KEY=VALUE...][@PROMPT_TOKENS]")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens of a run without @")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prefill-repeats", type=int, default=0, help="interleaved prefills per run, timed first")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are dropped)")
    if args.prefill_repeats < 0:
        parser.error(f"--prefill-repeats must be >= 0, got {args.prefill_repeats}")
    torch.set_num_threads(args.threads)
    model, tok = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    runs = args.runs.split(",")
    specs = [parse_run(run, args.length) for run in runs]
    methods = [method for method, _ in specs]
    prompts = [prompt_ids(tok, n) for _, n in specs]
    if args.prefill_repeats:
        prefills = interleaved_prefills(model, prompts, methods, args.prefill_repeats)
        for run, seconds in zip(runs, prefills):
            print(ratio_line(run, seconds, prefills[0], "prefill s", 1.0), flush=True)
    spent: list[float] = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda mod, *_: setattr(mod, "_t0", time.perf_counter()))
        layer.self_attn.register_forward_hook(lambda mod, *_: spent.append(time.perf_counter() - mod._t0))
    times = [t[2:] for t in interleaved_times(model, prompts, methods, args.steps, spent)]
    first = [t[0] for t in times[0]]
    for run, run_times in zip(runs, times):
        step, attn = [t[0] for t in run_times], [t[1] for t in run_times]
        print(
            ratio_line(run, step, first, "step ms", 1e3)
            + f"   self-attention ms min {1e3 * min(attn):6.1f} median {1e3 * statistics.median(attn):6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
