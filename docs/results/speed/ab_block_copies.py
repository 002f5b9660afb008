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
import types

import torch

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver
from kvsieve.ops import blocks
from kvsieve.ops.grouped import cast, dot_scores
from kvsieve.ops.scoring import top_indices

name, n, steps, old_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("block_store_old", old_path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.set_num_threads(1)
model, tok = kvsieve.load_model(None, dtype=torch.float32)
ids = prompt_ids(tok, n)


def sorted_selection(self, call, q_mem, window):
    """InfLLM's `select_blocks` before f5191bb: the top-k sorted ascending."""
    n_blocks = 0 if self.memory is None else self.memory.n_blocks
    if n_blocks == 0 or self.topk == 0:
        return None
    b = q_mem.shape[0]
    if n_blocks <= self.topk:
        return torch.arange(n_blocks, device=q_mem.device)[None].expand(b, n_blocks)
    mean = cast(q_mem[:, :, 0], torch.float32) if q_mem.shape[2] == 1 else q_mem.float().mean(dim=2)
    return top_indices(dot_scores(self.memory.reprs, mean.reshape(b, -1)), self.topk)


with torch.inference_mode():
    new = Driver.new(model, name, len(ids), reserve=steps + 8)
    new_logits = new.prefill(ids)
    current, blocks.AttendedBuffer = blocks.AttendedBuffer, old.AttendedBuffer  # BlockMemory builds the buffer
    try:
        ref = Driver.new(model, name, len(ids), reserve=steps + 8)
        if name.startswith("infllm"):
            for layer in ref.cache.sieve_layers:
                layer.policy.select_blocks = types.MethodType(sorted_selection, layer.policy)
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
