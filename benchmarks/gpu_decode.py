"""Decode on a GPU at 32K and 128K tokens: ms/token, peak memory and the share of the HBM bandwidth each step reaches.

The model is a random-init Llama of Llama-3.1-8B's shape (32 layers, 32 query / 8 KV heads, head_dim 128, hidden
4096, intermediate 14336, vocab 128256, llama3 RoPE), built on the device in ``--dtype``: random weights decode as
fast as trained ones, and no checkpoint is needed. The prompt is random token ids (``--seed``).

The measurement is `long_decode.py`'s, reused: per prompt length one shared prefill in ``--chunk-size`` chunks
(`kvsieve.prefill_sharing`) builds the full cache and those of the methods that compress after a plain prefill
(SnapKV, PyramidKV, H2O, StreamingLLM, NACL, RefreshKV); InfLLM and ActQKV prefill on their own. Then, repetition
by repetition, each method decodes ``--new-tokens`` greedy tokens from a copy of its cache (the first step of each
is the prompt's own logits, so ``new_tokens - 1`` steps are timed, device-synchronised, by the driver), and so
does the full cache of a random prompt whose steps attend as many entries as the method's: the floor. The
speed-up over the full cache and the floor ratio are paired within a repetition (medians over them).

Per row, beside `long_decode.py`'s columns:

* ``peak_bytes``: what one decode of this method holds on the device at its peak -- the weights plus
  ``torch.cuda.max_memory_allocated()`` during its decode above what was allocated before it (its copy of the cache,
  the entries it adds, activations); the other methods' caches waiting their turn are not counted.
  ``prefill_peak_bytes``: ``max_memory_allocated()`` over the length's prefills (all of them, shared and own;
  the floors' short prefills come later and are not counted).
* ``bytes_per_step``: the weights a decode step reads (every parameter but the input embedding, of which one row
  is read) plus the K/V it attends (``attended_per_step`` entries per KV head and layer, keys and values);
  ``bandwidth_fraction``: ``bytes_per_step / (decode_ms / 1000) / (--bandwidth-gbs * 1e9)``. Host-to-device block
  loads (InfLLM, ActQKV) and small tensors (queries, scores) are not counted.

Resumable: each prompt length is a unit; its rows are appended to ``OUT/rows.jsonl`` when it is done, and a rerun
with the same ``--out`` skips the lengths already there. Run on an H200 (docs/results/gpu_decode.md):

    python benchmarks/gpu_decode.py --out docs/results/gpu_decode

On a CPU at a toy size (tests/test_gpu_decode.py): ``--layers 2 --heads 4 --kv-heads 2 --head-dim 16 --hidden 64
--intermediate 128 --vocab 256 --lengths 96 --budget 32 --chunk-size 40 --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks are scripts: long_decode sits beside

import kvsieve
import long_decode
from kvsieve.eval.environment import environment
from kvsieve.models.devices import check_device

DEFAULT_METHODS = long_decode.DEFAULT_METHODS
H200_BANDWIDTH_GBS = 4800.0
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_shaped(args: argparse.Namespace, device: torch.device):
    """A random-init Llama of the given shape, in ``args.dtype``, built directly on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with device:  # weights allocated and initialised on the device (an 8B model initialised on a CPU takes minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[args.dtype], attn_implementation="sdpa")
    return model.eval()


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: every parameter but the input embedding (one row of it)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_step(model, attended_per_step: float | None) -> float:
    """Bytes of K/V a decode step attends: ``attended_per_step`` entries per KV head and layer, keys and values."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    per_entry = config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * element
    return (attended_per_step or 0.0) * per_entry


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def random_ids(args: argparse.Namespace) -> long_decode.IdsOf:
    """A random prompt of each length (seeded by ``--seed`` and the length)."""

    def ids_of(n: int) -> list[int]:
        return torch.randint(0, args.vocab, (n,), generator=torch.Generator().manual_seed(args.seed + n)).tolist()

    return ids_of


@torch.inference_mode()
def measure_length(model, n: int, args: argparse.Namespace, methods: dict[str, kvsieve.Method]) -> list[dict]:
    """`long_decode.measure_length` on a random prompt (the full cache, every method and their floors, paired per
    repetition), with each decode's CUDA peak and the bytes a step reads."""
    device = model.get_input_embeddings().weight.device
    all_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks: dict[str, int] = {}
    prefill_peak: list[int] = []

    def timer(name: str, driver, logits, new_tokens: int) -> tuple[float, float | None]:
        if not _cuda(device):
            return long_decode.time_decode(driver, logits, new_tokens)
        torch.cuda.synchronize(device)
        if not prefill_peak:  # the first decode: every prefill of this length is done
            prefill_peak.append(torch.cuda.max_memory_allocated(device))
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        ms, attended = long_decode.time_decode(driver, logits, new_tokens)
        peaks[name] = max(peaks.get(name, 0), all_weights + torch.cuda.max_memory_allocated(device) - before)
        return ms, attended

    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    rows = long_decode.measure_length(model, n, random_ids(args), args, methods, timer)
    weights = weight_bytes_per_step(model)
    for row in rows:
        per_step = weights + kv_bytes_per_step(model, row["attended_per_step"])
        row.update(
            peak_bytes=peaks.get(row["method"]),
            prefill_peak_bytes=prefill_peak[0] if prefill_peak else None,
            weight_bytes_per_step=weights,
            bytes_per_step=per_step,
            bandwidth_gbs=args.bandwidth_gbs,
            bandwidth_fraction=per_step / (row["decode_ms"] / 1e3) / (args.bandwidth_gbs * 1e9),
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**30:.1f}"

    lines = [
        "| tokens | method | prefill s | decode ms/token (range) | speed-up over full | floor ratio | attended/step "
        "| KV MiB | peak GiB | GB read/step | HBM bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        attended = "-" if r["attended_per_step"] is None else f"{r['attended_per_step']:.0f}"
        floor = "-" if r["floor_ratio"] is None else f"{r['floor_ratio']:.2f}"
        spread = f"{r['decode_ms']:.2f} ({min(r['decode_ms_all']):.2f}-{max(r['decode_ms_all']):.2f})"
        lines.append(
            f"| {r['tokens']} | {r['method']} | {r['prefill_s']:.1f} | {spread} | {r['speedup_over_full']:.2f}x "
            f"| {floor} | {attended} "
            f"| {r['kv_bytes'] / 2**20:.1f} | {gib(r['peak_bytes'])} | {r['bytes_per_step'] / 1e9:.2f} "
            f"| {r['bandwidth_fraction']:.1%} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape (default: Llama-3.1-8B)")
    shape.add_argument("--layers", type=int, default=32)
    shape.add_argument("--heads", type=int, default=32, help="query heads")
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--head-dim", type=int, default=128)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--intermediate", type=int, default=14336)
    shape.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (full always runs)")
    parser.add_argument("--budget", type=int, default=2048, help="entries per layer and KV head (every method)")
    parser.add_argument("--lengths", default="32768,131072", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per decode (the first from the prefill)")
    parser.add_argument("--repeats", type=int, default=2, help="decodes per method (the median is reported)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk (every method)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (a GPU if any, else the CPU)")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=H200_BANDWIDTH_GBS, help="the device's memory bandwidth, GB/s"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt")
    parser.add_argument("--out", default=None, metavar="DIR", help="run directory: rows.jsonl, env.json (resumes)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one decode step), got {args.new_tokens}")
    if args.bandwidth_gbs <= 0:
        parser.error(f"--bandwidth-gbs must be > 0, got {args.bandwidth_gbs}")
    try:
        args.lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    try:
        device = check_device(args.device, "--device")
    except ValueError as error:
        parser.error(str(error))
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every length of ``args.lengths`` not yet in ``args.out``: its rows, appended there as it completes."""
    methods = {name: kvsieve.method(name, budget=args.budget) for name in args.methods.split(",") if name}
    methods.pop("full", None)  # always measured, as the reference
    out = None if args.out is None else Path(args.out)
    done = long_decode.read_rows(out)
    todo = [n for n in args.lengths if not any(r["tokens"] == n for r in done)]
    for n in sorted(set(args.lengths) - set(todo)):
        print(f"{n} tokens: already in {out}/rows.jsonl, skipped", flush=True)
    rows = list(done)
    if not todo:
        return rows
    model = llama_shaped(args, torch.device(args.device))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        record = {"env": environment(model), "args": vars(args)}
        (out / "env.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    for n in todo:
        new = measure_length(model, n, args, methods)
        rows.extend(new)
        if out is not None:
            with (out / "rows.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    return rows


def main(argv: list[str] | None = None) -> None:
    print(table(run(parse_args(argv))))


if __name__ == "__main__":
    main()
