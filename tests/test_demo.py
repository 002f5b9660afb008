"""`kvsieve demo`: the full cache beside the seed methods and a baseline, nothing cut, memory on and off the device.

On the default model the demo's promise is checked as a known answer: at the budget shown (20%), every method in
the table answers the planted fact.
"""

from __future__ import annotations

import pytest

from helpers import IdTokenizer, random_ids, tiny_model
from kvsieve.demo import DEFAULT_METHODS, demo_methods, format_table, run_demo, run_rows


def test_table_shows_every_method_whole_with_memory_on_and_off_the_device():
    model = tiny_model("llama")
    prompt = " ".join(map(str, random_ids(1200)))
    rows = run_rows(model, IdTokenizer(), prompt, demo_methods(DEFAULT_METHODS, 0.5), max_new_tokens=3)
    assert [r.method.name for r in rows] == ["full", *DEFAULT_METHODS]
    expected = rows[0].output.text.split()[0]  # the full cache's first token: "found" where a method says it
    lines = format_table(rows, expected)
    header, rule, body = lines[0], lines[1], lines[2:]
    assert set(rule) == {"-"} and len(body) == len(rows)
    answer_column = header.index("answer")
    for row, line in zip(rows, body):
        assert line.startswith(row.label + " ")  # the label whole, never cut mid-word
        assert line[answer_column:] == " ".join(row.output.text.split())
        found = expected.lower() in row.output.text.lower()
        assert line[:answer_column].rstrip().endswith("yes" if found else "no")
    by_name = {r.method.name: r for r in rows}
    assert by_name["actqkv"].host_bytes > 0  # ActQKV's blocks live in host memory: shown apart
    assert all(by_name[n].host_bytes == 0 for n in ("full", "snapkv", "nacl", "refreshkv"))
    assert body[1].split()[4] == "-"  # snapkv: "label (budget)  N MiB  -": nothing elsewhere
    assert by_name["snapkv"].output.stats.kv_bytes < by_name["full"].output.stats.kv_bytes


def test_bad_method_or_budget_fails_before_loading():
    with pytest.raises(ValueError, match="unknown method"):
        demo_methods(["snapkvv"], 0.2)
    with pytest.raises(ValueError, match="budget"):
        demo_methods(["snapkv"], 1.5)


@pytest.mark.slow
def test_default_demo_answers_with_every_method(capsys):
    assert run_demo(None, "float32", DEFAULT_METHODS, 0.2, max_new_tokens=24) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) == {"-"}) + 1
    rows = lines[start : lines.index("", start)]  # the table: from its rule to the first blank line
    assert [line.split(" ")[0] for line in rows] == ["full", *DEFAULT_METHODS]
    assert len(rows) == 1 + len(DEFAULT_METHODS)
    for line in rows:
        assert " yes " in line and "cardamom" in line.lower(), line
    assert "noisy" in out
