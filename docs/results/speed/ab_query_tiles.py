"""The A/B behind speed.md's "InfLLM's prefill, a tile of queries at a time" figures (kept as the record of that
measurement, not a maintained benchmark): one process, prefills of Full and of a block method with
`merged_attention` tiled (``QUERY_TILE`` queries a tile, the default) and untiled (the whole window as one tile,
as before tiling), alternating round by round in a rotating order. Prints the medians and, per round, the ratios
to Full's prefill and tiled/untiled.

    OMP_NUM_THREADS=1 python docs/results/speed/ab_query_tiles.py infllm-2k 4096 5
"""

import functools
import statistics
import sys
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver
from kvsieve.methods import infllm
from kvsieve.ops.merged import merged_attention

name, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
model, tok = kvsieve.load_model(None, dtype=torch.float32)
ids = prompt_ids(tok, n)
untiled = functools.partial(merged_attention, query_tile=1 << 30)


def prefill(method: str, tiled: bool) -> float:
    infllm.merged_attention = merged_attention if tiled else untiled
    try:
        driver = Driver.new(model, method, len(ids), reserve=8)
        start = time.perf_counter()
        driver.prefill(ids)
        return time.perf_counter() - start
    finally:
        infllm.merged_attention = merged_attention


runs = [("full", True), (name, True), (name, False)]
times = {run: [] for run in runs}
with torch.inference_mode():
    prefill(name, True)  # warm-up
    for r in range(rounds):
        for i in range(len(runs)):
            run = runs[(r + i) % len(runs)]
            times[run].append(prefill(*run))
full, tiled, flat = (times[run] for run in runs)
for label, ts in (("full", full), (f"{name} tiled", tiled), (f"{name} untiled", flat)):
    print(f"{label:22s} prefill s median {statistics.median(ts):.2f} min {min(ts):.2f}")
for label, num, den in (
    ("tiled / full", tiled, full),
    ("untiled / full", flat, full),
    ("tiled / untiled", tiled, flat),
):
    ratios = [a / b for a, b in zip(num, den)]
    print(f"{label:16s} median {statistics.median(ratios):.3f} min {min(ratios):.3f} max {max(ratios):.3f}")
