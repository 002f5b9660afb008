"""The one-op timings and page-fault counts behind speed.md's "A prefill window a tile of queries at a time" and the
bf16 paragraph (kept as the record of those measurements, not a maintained benchmark), one torch thread, medians of
200 calls:

* ActQKV's window variance, ``[1, 256, 576]`` float32: torch's ``var`` along dim 1 against the two passes
  `ActivationStats.update` uses (mean, then mean squared deviation);
* a bf16 local tile of infllm-2k on the default model (``[3, 384, 64] x [3, 64, 639]``): the ``bmm`` against the
  float32 cast of its logits;
* with ``--faults``: two rounds of 4K prefills of Full and InfLLM, seconds and minor page faults each (run it again
  with ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296`` for the faults gone).

    OMP_NUM_THREADS=1 python docs/results/speed/op_costs_1207.py [--faults]
"""

import resource
import statistics
import sys
import time

import torch

torch.set_num_threads(1)


def median_us(fn, repeats: int = 200) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


h = torch.randn(1, 256, 576)
mu = h.mean(dim=1)
print(f"var along dim 1: {median_us(lambda: h.var(dim=1, unbiased=False)):.0f} us")
print(f"two passes:      {median_us(lambda: (h - h.mean(dim=1)[:, None]).square().mean(dim=1)):.0f} us")
q, k = torch.randn(3, 384, 64).bfloat16(), torch.randn(3, 64, 639).bfloat16()
logits = torch.bmm(q, k)
print(f"bf16 tile bmm:   {median_us(lambda: torch.bmm(q, k)):.0f} us")
print(f"its fp32 cast:   {median_us(lambda: logits.float()):.0f} us")

if "--faults" in sys.argv:
    import kvsieve
    from kvsieve.bench import prompt_ids
    from kvsieve.driver import Driver

    model, tok = kvsieve.load_model(None, dtype=torch.float32)
    ids = prompt_ids(tok, 4096)
    with torch.inference_mode():
        for _ in range(2):
            for name in ("full", "infllm-2k"):
                driver = Driver.new(model, name, len(ids), reserve=8)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                driver.prefill(ids)
                seconds = time.perf_counter() - start
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                print(f"{name:10s} prefill {seconds:.2f} s, {faults} minor faults")
                del driver
