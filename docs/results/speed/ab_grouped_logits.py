"""The A/B behind speed.md's bf16 `grouped_logits` figures (kept as the record of that measurement, not a maintained
benchmark): one process, one prefill, then decode steps alternating between the current `grouped_logits` and the
one of 4c8f823's parent, self-attention timed by hooks as in `benchmarks/attn_step.py`.

    git show 4c8f823^:src/kvsieve/ops/grouped.py > /tmp/grouped_old.py
    OMP_NUM_THREADS=1 python docs/results/speed/ab_grouped_logits.py infllm-2k 16384 40 /tmp/grouped_old.py
"""

import importlib.util
import statistics
import sys
import time

import torch

import kvsieve
import kvsieve.ops.attention as attn
import kvsieve.ops.grouped as grouped
import kvsieve.ops.merged as merged
from kvsieve.bench import prompt_ids
from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import Phase

spec = importlib.util.spec_from_file_location("grouped_old", sys.argv[4])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
impl = {"new": grouped.grouped_logits, "old": old.grouped_logits}
torch.set_num_threads(1)
model, tok = kvsieve.load_model("qwen2.5-coder-0.5b", dtype=torch.bfloat16)
spent = []
for layer in model.model.layers:
    layer.self_attn.register_forward_pre_hook(lambda mod, *_: setattr(mod, "_t0", time.perf_counter()))
    layer.self_attn.register_forward_hook(lambda mod, *_: spent.append(time.perf_counter() - mod._t0))
method, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = prompt_ids(tok, n)
res = {"new": [], "old": []}
with torch.inference_mode():
    cache = SieveCache(model, kvsieve.method(method).for_prompt(len(ids)))
    with cache.forward_as(Phase.PREFILL_LAST):
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1, **cache_kwargs(model, cache)).logits
    for i in range(steps):
        arm = "new" if i % 2 == 0 else "old"
        merged.grouped_logits = attn.grouped_logits = impl[arm]
        spent.clear()
        t = time.perf_counter()
        logits = model(input_ids=logits[:, -1].argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits
        res[arm].append((time.perf_counter() - t, sum(spent)))
for arm, r in res.items():
    step, attn_ms = ([1e3 * x[k] for x in r[2:]] for k in (0, 1))
    print(arm, f"step min {min(step):.1f} med {statistics.median(step):.1f}", end="  ")
    print(f"attn min {min(attn_ms):.1f} med {statistics.median(attn_ms):.1f}")
