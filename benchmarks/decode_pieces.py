"""Where a decode step's attention time goes inside the model: wall time of each piece of InfLLM's / ActQKV's layer
step, per layer and step, beside the full cache's attention kernel at the floor's context.

`profile_blocks.py` profiles the same steps with cProfile and torch.profiler, whose own cost per call (several
microseconds) is of the size of the pieces measured here. This wraps only the named functions in a
``perf_counter_ns`` pair (well under a microsecond each) and times greedy steps after a prefill, so the pieces read
as they run: with the model's linear layers between them, caches are cold and every op costs several times what it
does in a loop of its own (`--isolated` times a few ops both ways). A piece's time includes the pieces it calls
(``attend`` is the whole layer step; ``merged`` the attention over its two parts; ``gather`` the attended
buffer's block copies). For block memories it also prints the blocks copied into the attended buffer per layer and
step, and their K/V bytes (a row's block each).

    OMP_NUM_THREADS=1 python benchmarks/decode_pieces.py --methods full@2056,infllm-2k,actqkv-2k --length 4096
    OMP_NUM_THREADS=1 python benchmarks/decode_pieces.py --isolated
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time

import torch
import torch.nn.functional as F

import kvsieve
from kvsieve.bench import prompt_ids
from kvsieve.driver import Driver
from kvsieve.methods import actqkv, infllm
from kvsieve.ops import block_store, blocks, rope

# (owner, attribute, label): the pieces timed. Full's attention is torch's sdpa call (transformers' or kvsieve's).
PIECES = [
    (infllm.InfLLMPolicy, "attend", "attend"),
    (infllm, "merged_attention", "merged"),
    (blocks.BlockMemory, "fetch", "fetch"),
    (block_store.AttendedBuffer, "gather", "gather"),
    (torch, "_foreach_copy_", "block copies"),
    (infllm.InfLLMPolicy, "select_blocks", "select_blocks"),
    (actqkv.ActQKVPolicy, "select_blocks", "select_blocks"),
    (actqkv.ActQKVPolicy, "probe", "actqkv probe"),
    (actqkv.ActQKVPolicy, "similarity", "actqkv similarity"),
    (actqkv, "normalized_entropy", "actqkv entropy"),
    (actqkv.BlockPool, "take", "actqkv pool"),
    (rope.Rotary, "move", "query move"),
    (blocks.TokenBuffer, "derive_keys", "remainder keys"),
    (blocks.TokenBuffer, "derived_span", "remainder span"),
    (infllm.InfLLMPolicy, "update", "cache update"),
    (infllm.InfLLMPolicy, "kv_bytes", "kv_bytes"),
    (infllm.InfLLMPolicy, "advance", "advance"),
    (F, "scaled_dot_product_attention", "sdpa"),
]


class Timer:
    """Wraps the pieces; accumulates their wall time while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.ns: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            start = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                self.ns[label] += time.perf_counter_ns() - start
                self.calls[label] += 1

        setattr(owner, name, timed)


@torch.inference_mode()
def run(model, tok, method: str, length: int, steps: int, timer: Timer) -> dict:
    """Prefill ``length`` tokens (``METHOD@N``: N instead), 3 warm-up steps, then ``steps`` timed greedy steps."""
    name, _, tokens = method.partition("@")
    ids = prompt_ids(tok, int(tokens or length))
    driver = Driver.new(model, name, len(ids), reserve=steps + 8)
    logits = driver.prefill(ids)
    for _ in range(3):
        logits = driver.step(int(logits[0].argmax()))
    timer.ns.clear(), timer.calls.clear()
    copies_before = block_copies(driver)
    timer.on = True
    start = time.perf_counter()
    for _ in range(steps):
        logits = driver.step(int(logits[0].argmax()))
    total = time.perf_counter() - start
    timer.on = False
    layers = model.config.num_hidden_layers
    per = {label: ns / 1e3 / steps / layers for label, ns in timer.ns.items()}
    row = {"method": method, "step_ms": 1e3 * total / steps, "us_per_layer_step": per}
    if copies_before is not None:  # block memories: the blocks moved into the attended buffer, and their bytes
        copied, block_bytes = block_copies(driver)[0] - copies_before[0], copies_before[1]
        row["blocks_copied_per_layer_step"] = copied / steps / layers
        row["copied_kib_per_layer_step"] = copied * block_bytes / 1024 / steps / layers
    return row


def block_copies(driver: Driver) -> tuple[int, int] | None:
    """Blocks copied into the attended buffers so far (all layers and batch rows) and the K and V bytes of one row's
    block, or None without a block memory holding blocks."""
    memories = [getattr(layer.policy, "memory", None) for layer in driver.cache.sieve_layers]
    memories = [m for m in memories if isinstance(m, blocks.BlockMemory)]
    if not memories or not memories[0].store.n_blocks:  # no block memory, or no block in it yet
        return None
    k, v = memories[0].store.block(0, 0)  # one row's block: [H_kv, bs, D]
    return sum(m.buffer.copies for m in memories), k.nbytes + v.nbytes


def isolated(repeats: int) -> list[tuple[str, float, float]]:
    """A few of a decode step's ops, each timed alone in a loop and with one of the model's linear layers (a 576 x
    1536 weight, 3.5 MB) run between calls, as in the model: microseconds per call, (alone, with the linear)."""
    weight, x_in = torch.randn(1536, 576), torch.randn(1, 576)
    query = torch.randn(1, 1, 9, 64).transpose(1, 2)  # a decode step's query, as the model hands it
    cos, sin, matrix = torch.randn(1, 64), torch.randn(1, 64), torch.randn(64, 64)
    ops = {
        "mul by a scalar": lambda: query * 0.125,
        "rotation, elementwise (mul, roll, addcmul)": lambda: torch.addcmul(query * cos, query.roll(32, -1), sin),
        "rotation, one matmul": lambda: torch.matmul(query, matrix),
    }
    rows = []
    for label, op in ops.items():
        times = []
        for between in (False, True):
            for _ in range(50):
                op()
            spent = 0
            for _ in range(repeats):
                if between:
                    F.linear(x_in, weight)
                start = time.perf_counter_ns()
                op()
                spent += time.perf_counter_ns() - start
            times.append(spent / 1e3 / repeats)
        rows.append((label, *times))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full@2056,infllm-2k,actqkv-2k", help="METHOD[@PROMPT_TOKENS],...")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="kvsieve model alias or directory (default: the default model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--isolated", action="store_true", help="time a few ops alone and between linear layers")
    parser.add_argument("--repeats", type=int, default=2000, help="calls per op with --isolated")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the rows here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.isolated:
        print("| op | alone, us | between linear layers, us | ratio |\n|---|---:|---:|---:|")
        for label, alone, between in isolated(args.repeats):
            print(f"| {label} | {alone:.1f} | {between:.1f} | {between / alone:.1f} |")
        return
    timer = Timer()
    for owner, name, label in PIECES:
        timer.wrap(owner, name, label)
    model, tok = kvsieve.load_model(args.model, dtype=getattr(torch, args.dtype))
    rows = [run(model, tok, method, args.length, args.steps, timer) for method in args.methods.split(",")]
    for row in rows:
        print(f"\n{row['method']}: {row['step_ms']:.2f} ms a step; per layer and step, us:")
        if "blocks_copied_per_layer_step" in row:
            print(
                f"  ({row['blocks_copied_per_layer_step']:.2f} blocks copied into the attended buffer, "
                f"{row['copied_kib_per_layer_step']:.0f} KiB)"
            )
        for label, us in sorted(row["us_per_layer_step"].items(), key=lambda item: -item[1]):
            print(f"  {label:20s} {us:8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
