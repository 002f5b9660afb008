"""``kvsieve demo``: answer a question about a long built-in document with the full cache and a compressed one,
side by side, with the KV memory each held and the timings."""

from __future__ import annotations

import kvsieve
from kvsieve.methods.base import Method


def run_demo(model_name: str | None, dtype: str, method: Method, max_new_tokens: int) -> int:
    from kvsieve.eval.tasks import demo_document

    document, question, expected = demo_document()
    model, tokenizer = kvsieve.load_model(model_name, dtype=dtype)
    prompt = f"{document}\n\n{question}"  # query-aware: the question is part of the compressed prompt
    rows = []
    for candidate in (kvsieve.method("full"), method):
        out = kvsieve.generate(model, tokenizer, prompt, method=candidate, max_new_tokens=max_new_tokens)
        rows.append((str(candidate) if candidate.name != "full" else "full", out))
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    print(f"kvsieve demo: {name}, {rows[0][1].stats.prompt_tokens} prompt tokens")
    print(f"question: {question}")
    print(f"expected: {expected}\n")
    header = f"{'method':<34} {'KV entries':>10} {'KV memory':>10} {'prefill':>8} {'decode':>9}  answer"
    print(header)
    print("-" * len(header))
    for label, out in rows:
        s = out.stats
        decode = "-" if s.decode_s_per_token is None else f"{s.decode_s_per_token * 1000:.0f} ms/t"
        answer = " ".join(out.text.split())
        print(
            f"{label[:34]:<34} {s.kv_stored_tokens:>10.0f} {s.kv_bytes / 2**20:>7.1f} MiB {s.prefill_s:>7.1f}s "
            f"{decode:>9}  {answer}"
        )
    full_kv, small_kv = rows[0][1].stats.kv_bytes, rows[1][1].stats.kv_bytes
    print(f"\n{method.name} held {small_kv / full_kv:.0%} of the full cache's KV memory.")
    found = [expected.lower() in " ".join(out.text.split()).lower() for _, out in rows]
    print(
        "answer found: "
        + ", ".join(f"{label.split('(')[0]}={'yes' if ok else 'no'}" for (label, _), ok in zip(rows, found))
    )
    return 0
