"""``kvsieve demo``: one question about a long built-in document, answered by the full cache and by compressed
ones side by side -- the three seed methods (NACL, RefreshKV, ActQKV) and a baseline (SnapKV) -- with the KV
memory each held on the device and elsewhere, and the timings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kvsieve
from kvsieve.generate import GenerationOutput
from kvsieve.methods.base import Method

DEFAULT_METHODS = ("snapkv", "nacl", "refreshkv", "actqkv")


@dataclass
class DemoRow:
    label: str  # the method's name and budget, never cut
    method: Method  # as it ran on the prompt (a fractional budget resolved)
    output: GenerationOutput

    @property
    def host_bytes(self) -> int:
        """K/V kept off the device (InfLLM/ActQKV's host block store), summed over layers."""
        return sum(int(layer.get("host_bytes", 0)) for layer in self.output.stats.layers)


def demo_methods(names: Sequence[str], budget: int | float) -> list[Method]:
    """The full cache first, then each named method at ``budget`` (InfLLM/ActQKV derive their blocks from it)."""
    out = [kvsieve.method("full")]
    for name in names:
        if name == "full":
            continue
        out.append(kvsieve.method(name, budget=budget))
    return out


def run_rows(model, tokenizer, prompt: str, methods: Sequence[Method], max_new_tokens: int) -> list[DemoRow]:
    """Each method answers the same query-aware prompt (the question at its end), greedily."""
    rows = []
    for m in methods:
        out = kvsieve.generate(model, tokenizer, prompt, method=m, max_new_tokens=max_new_tokens)
        budget = getattr(m, "budget", None)
        label = (
            m.name
            if budget is None
            else f"{m.name} ({budget:g})"
            if isinstance(budget, float)
            else f"{m.name} ({budget})"
        )
        rows.append(DemoRow(label, m.for_prompt(out.stats.prompt_tokens), out))  # as it ran: fractions resolved
    return rows


def format_table(rows: Sequence[DemoRow], expected: str) -> list[str]:
    """The side-by-side table: one line per method, columns sized to their longest cell (nothing is cut)."""

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    header = ["method", "KV on device", "KV elsewhere", "attended/step", "prefill", "decode", "found", "answer"]
    cells = []
    for row in rows:
        s = row.output.stats
        decode = "-" if s.decode_s_per_token is None else f"{s.decode_s_per_token * 1000:.0f} ms/token"
        attended = "-" if s.attended_per_step is None else f"{s.attended_per_step:.0f}"
        answer = " ".join(row.output.text.split())
        found = "yes" if expected.lower() in answer.lower() else "no"
        elsewhere = mib(row.host_bytes) if row.host_bytes else "-"
        cells.append([row.label, mib(s.kv_bytes), elsewhere, attended, f"{s.prefill_s:.1f} s", decode, found, answer])
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *cells]:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]
        )
        if r is header:
            lines.append("-" * len(lines[0]))
    return lines


def run_demo(
    model_name: str | None,
    dtype: str,
    names: Sequence[str],
    budget: int | float,
    max_new_tokens: int,
    *,
    device_map: str | None = None,
) -> int:
    from kvsieve.eval.tasks import demo_document

    document, question, expected = demo_document()
    methods = demo_methods(names, budget)  # bad names or budgets fail before the model loads
    model, tokenizer = kvsieve.load_model(model_name, dtype=dtype, device_map=device_map)
    prompt = f"{document}\n\n{question}"  # query-aware: the question is part of the compressed prompt
    rows = run_rows(model, tokenizer, prompt, methods, max_new_tokens)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    device = next(model.parameters()).device
    print(f"kvsieve demo: {name}, {dtype} on {device}, {rows[0].output.stats.prompt_tokens} prompt tokens")
    print(f"question: {' '.join(question.split())}")
    print(f"expected: {expected}\n")
    print("\n".join(format_table(rows, expected)))
    full_kv = rows[0].output.stats.kv_bytes
    print()
    for row in rows[1:]:
        print(
            f"{row.label}: {row.output.stats.kv_bytes / full_kv:.0%} of the full cache's KV on the device; {row.method}"
        )
    print(
        "\nKV on device: K/V bytes right after the prompt (RefreshKV keeps the full cache and decodes over a partial"
        " one; InfLLM/ActQKV keep their blocks in host memory, 'elsewhere'). attended/step: entries a decode step"
        " reads. Timings come from one run on a shared machine and are noisy; `kvsieve bench` measures them."
    )
    return 0
