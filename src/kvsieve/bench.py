"""``kvsieve bench``: prefill time, decode time per token and KV memory of methods side by side, in one run.

Every method prefills the same public-domain prompt (``kvsieve/data``: KJV Genesis/Exodus, then Paradise Lost,
repeated if a length needs more) through `kvsieve.generate` and decodes ``new_tokens`` greedily without stopping
at EOS. Methods run interleaved, repetition by repetition, so that drift on a shared machine hits them alike;
ratios to a reference (the full cache unless told otherwise) are taken pair by pair within a repetition, and
their median is reported. Memory comes
from the cache's tensors (`GenerationStats`) and, on CUDA, from the allocator's peak during each run.

Timings are the clock around the model's forwards (`GenerationStats.prefill_s`, ``decode_s_per_token``), so
tokenization and model loading are not in them. One warm-up run at a short length precedes the measurements.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvsieve.eval.config import EvalConfig, MethodRun
from kvsieve.eval.plan import beyond_window_reason
from kvsieve.eval.tasks.text import public_domain_text
from kvsieve.generate import generate
from kvsieve.methods.base import check_int
from kvsieve.models import trained_window
from kvsieve.progress import progress_bar

__all__ = [
    "BenchRow",
    "bench",
    "bench_runs",
    "floor_length",
    "format_bench",
    "machine_line",
    "noise_warnings",
    "prompt_ids",
]

PROMPT_SOURCES = ("kjv", "paradise_lost")


@dataclass
class BenchRow:
    """One method at one budget and prompt length: medians over the repetitions (None where not measured)."""

    method: str
    budget: str
    tokens: int
    new_tokens: int
    repeats: int
    status: str = "ok"  # or "skipped"
    reason: str | None = None
    prefill_s: float | None = None
    prefill_ratio: float | None = None  # median over repetitions of prefill_s / the reference's, same repetition
    decode_ms_per_token: float | None = None
    decode_ratio: float | None = None
    reference: str | None = None  # the run the ratios compare with (default: the full cache)
    kv_bytes: int | None = None  # K/V held right after prefill (and compression)
    kv_bytes_end: int | None = None  # at the end of decoding
    kv_bytes_full: int | None = None  # the same layers with the whole prompt
    host_bytes: int | None = None  # blocks kept off the device (InfLLM, ActQKV)
    device_peak_bytes: int | None = None  # CUDA allocator peak during the run (model weights included)
    attended_per_step: float | None = None
    same_prefix_as_ref: int | None = None  # leading generated tokens equal to the reference's
    floor_tokens: int | None = None  # the full cache's prompt length whose decode steps attend as many entries
    floor_decode_ms: float | None = None  # the full cache's decode ms/token at floor_tokens (median)
    floor_ratio: float | None = None  # median over repetitions of decode ms / the floor's, same repetition
    prefill_s_all: list[float] = field(default_factory=list)
    decode_ms_all: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _source_ids(tokenizer) -> tuple[int, ...]:
    text = "\n\n".join(public_domain_text(source) for source in PROMPT_SOURCES)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of the shipped public-domain texts, repeated if they are too short."""
    if n_tokens < 1:
        raise ValueError(f"prompt length must be >= 1 token, got {n_tokens}")
    ids = list(_source_ids(tokenizer))
    reps = -(-n_tokens // len(ids))
    return (ids * reps)[:n_tokens]


def _measure(model, tokenizer, ids: list[int], run: MethodRun, new_tokens: int, chunk_size: int | None) -> dict:
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = generate(
        model, tokenizer, ids, method=run.method, max_new_tokens=new_tokens, chunk_size=chunk_size, chat=False,
        stop_at_eos=False,
    )  # fmt: skip
    s = out.stats
    host = [layer["host_bytes"] for layer in s.layers if layer.get("host_bytes") is not None]
    return {
        "tokens": out.tokens,
        "prefill_s": s.prefill_s,
        "decode_ms": None if s.decode_s_per_token is None else 1000 * s.decode_s_per_token,
        "kv_bytes": s.kv_bytes,
        "kv_bytes_end": s.kv_bytes_end,
        "kv_bytes_full": s.kv_bytes_full,
        "host_bytes": sum(host) if host else None,
        "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "attended_per_step": s.attended_per_step,
    }


def floor_length(attended_per_step: float | None, new_tokens: int) -> int | None:
    """The prompt length whose full-cache decode steps attend ``attended_per_step`` entries on average: the full
    cache's step ``t`` (1..new_tokens - 1, the first token comes from the prefill) attends ``n + t`` entries (the
    prompt, the tokens fed before and its own), a mean of ``n + new_tokens / 2``. None: nothing was decoded."""
    if attended_per_step is None or new_tokens < 2:
        return None
    return max(1, round(attended_per_step - new_tokens / 2))


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _ratios(values: Sequence[float | None], reference: Sequence[float | None] | None) -> float | None:
    if reference is None:
        return None
    return _median([a / b if a is not None and b else None for a, b in zip(values, reference)])


def bench_runs(
    methods: Sequence[str],
    lengths: Sequence[int],
    budgets: Sequence[int | float] = (0.2,),
    params: dict[str, dict[str, Any]] | None = None,
    new_tokens: int = 32,
    repeats: int = 3,
    chunk_size: int | None = None,
    reference: str = "full",
) -> list[MethodRun]:
    """Validate a benchmark's arguments without a model: the method runs, the full cache first."""
    config = EvalConfig(
        methods=list(methods), budgets=list(budgets), params=dict(params or {}), lengths=list(lengths), tasks=["lm"]
    )
    config.normalize()
    runs = config.validate()
    check_int("new_tokens", new_tokens, 1)
    check_int("repeats", repeats, 1)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if reference not in {run.name for run in runs}:
        raise ValueError(f"reference {reference!r} is not among the benchmarked methods {[r.name for r in runs]}")
    return runs


def bench(
    model,
    tokenizer,
    methods: Sequence[str],
    lengths: Sequence[int],
    budgets: Sequence[int | float] = (0.2,),
    params: dict[str, dict[str, Any]] | None = None,
    new_tokens: int = 32,
    repeats: int = 3,
    chunk_size: int | None = None,
    warmup: bool = True,
    on_run: Callable[[str], None] | None = None,
    reference: str = "full",
    progress: bool = False,
    floor: bool = False,
) -> list[BenchRow]:
    """Measure every method (at every budget; the full cache always, first) at every prompt length.

    ``methods``: registered names; ``budgets`` apply to each method that has a budget; ``params``:
    ``{method: {parameter: value}}``. A method that cannot extrapolate is skipped (status ``"skipped"``, with the
    reason) where the prompt plus the new tokens exceed the model's trained window. ``reference``: the method
    (its first budget) that ratios and the same-prefix count compare with, e.g. ``infllm-2k`` beyond the window.
    ``on_run(label)`` is called before each measured run; ``progress`` shows a bar with the time left on stderr.

    ``floor``: also time, in every repetition, the full cache on a prompt of the length whose decode steps attend
    as many entries as each method's (`floor_length`): nothing that attends that many entries can decode faster, so
    ``floor_ratio`` (decode ms / the floor's, pair by pair within a repetition) says how far a method is from it.
    """
    runs = bench_runs(methods, lengths, budgets, params, new_tokens, repeats, chunk_size, reference)
    ref_run = next(r for r in runs if r.name == reference)
    full_run = next(r for r in runs if r.name == "full")
    window = trained_window(model)

    def fits(run: MethodRun, n: int) -> bool:
        return window is None or n + new_tokens <= window or run.method.extrapolates

    bar = progress_bar(sum(fits(r, n) for r in runs for n in lengths) * repeats, 0, progress, "kvsieve bench", "run")
    if warmup:  # first-call costs (allocator, kernels) land here, not in the first measured method
        _measure(model, tokenizer, prompt_ids(tokenizer, min(256, min(lengths))), runs[0], 2, None)
    rows: list[BenchRow] = []
    for n in lengths:
        ids = prompt_ids(tokenizer, n)
        live: list[MethodRun] = []
        for run in runs:
            if not fits(run, n):
                reason = beyond_window_reason(n + new_tokens, window)
                rows.append(
                    BenchRow(run.name, run.label, n, new_tokens, 0, status="skipped", reason=reason,
                             params=run.method.params())
                )  # fmt: skip
            else:
                live.append(run)
        measured: dict[int, list[dict]] = {id(run): [] for run in live}
        floor_runs: dict[int, list[dict]] = {}
        for rep in range(repeats):
            for run in live:
                label = f"{run.name} {run.label} L{n} ({rep + 1}/{repeats})"
                if on_run is not None:
                    on_run(label)
                bar.set_postfix_str(label, refresh=False)
                measured[id(run)].append(_measure(model, tokenizer, ids, run, new_tokens, chunk_size))
                bar.update(1)
            if floor:
                wanted = {floor_length(measured[id(run)][0]["attended_per_step"], new_tokens) for run in live}
                for length in sorted(wanted - {None}):
                    if on_run is not None:
                        on_run(f"floor: full L{length} ({rep + 1}/{repeats})")
                    floor_runs.setdefault(length, []).append(
                        _measure(model, tokenizer, prompt_ids(tokenizer, length), full_run, new_tokens, chunk_size)
                    )
        ref = measured.get(id(ref_run))
        for run in live:
            ms = measured[id(run)]
            first = ms[0]
            same = None
            if ref is not None:
                tokens = ref[0]["tokens"]
                same = next((i for i, (a, b) in enumerate(zip(first["tokens"], tokens)) if a != b), len(tokens))
            prefill = [m["prefill_s"] for m in ms]
            decode = [m["decode_ms"] for m in ms]
            floor_tokens = floor_length(first["attended_per_step"], new_tokens) if floor else None
            floor_decode = [m["decode_ms"] for m in floor_runs.get(floor_tokens, [])] or None
            rows.append(
                BenchRow(
                    run.name,
                    run.label,
                    n,
                    new_tokens,
                    repeats,
                    prefill_s=_median(prefill),
                    prefill_ratio=_ratios(prefill, None if ref is None else [m["prefill_s"] for m in ref]),
                    decode_ms_per_token=_median(decode),
                    decode_ratio=_ratios(decode, None if ref is None else [m["decode_ms"] for m in ref]),
                    reference=None if ref is None else f"{ref_run.name} {ref_run.label}",
                    kv_bytes=first["kv_bytes"],
                    kv_bytes_end=first["kv_bytes_end"],
                    kv_bytes_full=first["kv_bytes_full"],
                    host_bytes=first["host_bytes"],
                    device_peak_bytes=max((m["device_peak_bytes"] or 0) for m in ms) or None,
                    attended_per_step=first["attended_per_step"],
                    same_prefix_as_ref=same,
                    floor_tokens=floor_tokens if floor_decode else None,
                    floor_decode_ms=None if floor_decode is None else _median(floor_decode),
                    floor_ratio=_ratios(decode, floor_decode),
                    prefill_s_all=prefill,
                    decode_ms_all=[d for d in decode if d is not None],
                    params=run.method.params(),
                )
            )
    bar.close()
    return rows


def noise_warnings(rows: Sequence[BenchRow]) -> list[str]:
    """Rows whose difference to the reference is within the noise of the repetitions: the spread (max - min over
    repetitions) of the row or of its reference exceeds the gap between their medians. One line each."""
    warnings = []
    by_key = {(r.tokens, f"{r.method} {r.budget}"): r for r in rows if r.status == "ok"}
    for row in rows:
        ref = by_key.get((row.tokens, row.reference)) if row.reference else None
        if row.status != "ok" or ref is None or ref is row:
            continue
        for name, unit, values, ref_values in (
            ("prefill", "s", row.prefill_s_all, ref.prefill_s_all),
            ("decode", "ms/token", row.decode_ms_all, ref.decode_ms_all),
        ):
            if len(values) < 2 or len(ref_values) < 2:
                continue
            gap = abs(statistics.median(values) - statistics.median(ref_values))
            own, theirs = max(values) - min(values), max(ref_values) - min(ref_values)
            spread, whose = (own, f"{row.method} {row.budget}") if own >= theirs else (theirs, row.reference)
            whose = whose.removesuffix(" -")
            if spread > gap:
                warnings.append(
                    f"{row.method} {row.budget} at {row.tokens} tokens: {name} differs from "
                    f"{row.reference.removesuffix(' -')} by "
                    f"{gap:.3g} {unit}, less than the {spread:.3g} {unit} spread of {whose}'s repetitions: "
                    "the difference is noise (use more --repeats, on a quieter machine)"
                )
    return warnings


def machine_line(env: dict[str, Any]) -> str:
    """One line from `kvsieve.eval.environment.environment`: where the numbers were taken."""
    model = env.get("model") or {}
    where = ", ".join(env["gpu"]) if env.get("gpu") else f"{env.get('cpu')} ({env.get('cpu_cores')} cores)"
    return (
        f"{where}, {env.get('torch_threads')} torch threads, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, {model.get('dtype')} on {model.get('device')}"
    )


def format_bench(rows: Sequence[BenchRow]) -> str:
    """The terminal table."""

    def num(value: float | None, spec: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, spec) + suffix

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.1f}"

    header = ["tokens", "method", "budget", "prefill s", "x ref", "decode ms/tok", "x ref", "x floor", "KV MiB",
              "KV end MiB", "host MiB", "peak MiB", "attended", "same prefix"]  # fmt: skip
    lines = [header]
    for r in rows:
        if r.status != "ok":
            lines.append([str(r.tokens), r.method, r.budget, f"skipped: {r.reason}"])
            continue
        lines.append(
            [
                str(r.tokens), r.method, r.budget, num(r.prefill_s, ".2f"), num(r.prefill_ratio, ".2f", "x"),
                num(r.decode_ms_per_token, ".1f"), num(r.decode_ratio, ".2f", "x"), num(r.floor_ratio, ".2f", "x"),
                mib(r.kv_bytes),
                mib(r.kv_bytes_end), mib(r.host_bytes), mib(r.device_peak_bytes), num(r.attended_per_step, ".0f"),
                "-" if r.same_prefix_as_ref is None else str(r.same_prefix_as_ref),
            ]
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines if len(line) == len(header)) for i in range(len(header))]
    text = []
    for k, line in enumerate(lines):
        if len(line) != len(header):
            text.append("  ".join([line[0].rjust(widths[0]), line[1].ljust(widths[1]), line[2].ljust(widths[2]),
                                   line[3]]))  # fmt: skip
            continue
        cells = [c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        text.append("  ".join(cells).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
