"""The A/B behind speed.md's "a step's new blocks in one copy" figures (kept as the record of that measurement, not a
maintained benchmark): one process, two drivers of one method on one prompt, the second built with the previous
`AttendedBuffer` (index_select + index_copy_) and, for InfLLM, its previous sorted block selection; their decode
steps alternate round by round, the first two dropped. Prints the medians and the new/old step ratio per round.

    git show f5191bb^:src/kvsieve/ops/block_store.py > /tmp/block_store_old.py
    OMP_NUM_THREADS=1 python docs/results/speed/ab_block_copies.py infllm-2k 4096 62 /tmp/block_store_old.py
"""

import importlib.util
import statistics
import sys
import time

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver
from kvsieve.ops import blocks

name, n, steps, old_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("block_store_old", old_path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.set_num_threads(1)
model, tok = kvsieve.load_model(None, dtype=torch.float32)
ids = prompt_ids(tok, n)


def sorted_selection(select):
    """InfLLM's `select_blocks` before f5191bb: the same top-k, sorted ascending."""

    def selected(call, q_mem, window):
        chosen = select(call, q_mem, window)
        return None if chosen is None else chosen.sort(dim=-1).values

    return selected


with torch.inference_mode():
    new = Driver.new(model, name, len(ids), reserve=steps + 8)
    new_logits = new.prefill(ids)
    current, blocks.AttendedBuffer = blocks.AttendedBuffer, old.AttendedBuffer  # BlockMemory builds the buffer
    try:
        ref = Driver.new(model, name, len(ids), reserve=steps + 8)
        if name.startswith("infllm"):
            for layer in ref.cache.sieve_layers:
                layer.policy.select_blocks = sorted_selection(layer.policy.select_blocks)
        ref_logits = ref.prefill(ids)
    finally:
        blocks.AttendedBuffer = current
    drivers, logits, times = [ref, new], [ref_logits, new_logits], [[], []]
    for step in range(steps):
        for offset in range(2):
            run = (step + offset) % 2
            start = time.perf_counter()
            logits[run] = drivers[run].step(int(logits[run][0].argmax()))
            times[run].append(time.perf_counter() - start)
t_old, t_new = times[0][2:], times[1][2:]
ratios = [a / b for a, b in zip(t_new, t_old)]
print(
    f"{name} at {n} tokens: old {1e3 * statistics.median(t_old):.1f} ms, new {1e3 * statistics.median(t_new):.1f} ms "
    f"a step; new/old median {statistics.median(ratios):.3f} min {min(ratios):.3f} max {max(ratios):.3f}"
)
