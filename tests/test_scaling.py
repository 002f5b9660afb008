"""benchmarks/scaling.py: the high-water mark it reads, the growth exponent, and a toy run that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import BENCHMARKS, load_benchmark, tiny_llama_for

scaling = load_benchmark("scaling")


def test_the_high_water_mark_is_reset_before_each_measurement():
    # in a child under MEMORY_ENV, as the script measures: a long test session's allocator state does not leak in
    code = (
        "import torch, scaling\n"
        "def allocate():\n    x = torch.ones(64 * 2**20 // 4)\n    x.add_(1)\n"
        "print(scaling.high_water_rise_mib(allocate), scaling.high_water_rise_mib(allocate))"
    )
    env = dict(
        os.environ, **scaling.MEMORY_ENV, PYTHONPATH=str(BENCHMARKS) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    first, second = (float(x) for x in done.stdout.split())
    # without the reset, the first peak hides the second: 0
    assert 60 <= first < 100 and 60 <= second < 100


def test_growth_exponent_is_one_for_linear_and_two_for_quadratic():
    lengths = [1024, 2048, 4096, 8192]
    assert scaling.growth_exponent(lengths, [3.0 * n for n in lengths]) == pytest.approx(1.0)
    assert scaling.growth_exponent(lengths, [n * n / 7 for n in lengths]) == pytest.approx(2.0)
    assert scaling.growth_exponent([1024], [1.0]) is None


def test_a_toy_run_writes_every_cell_once_and_resumes(smollm2_tokenizer, tmp_path, capsys):
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    tiny_llama_for(smollm2_tokenizer, 4096).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    argv = ["--model", str(model_dir), "--methods", "snapkv", "--budget", "32", "--lengths", "64",
            "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert scaling.main(argv) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["length"]) for r in rows] == [("full", 64), ("snapkv", 64)]
    assert all(r["prefill_s"] > 0 and r["peak_mib"] >= 0 and r["device"] == "cpu" for r in rows)
    assert "| snapkv |" in capsys.readouterr().out
    assert scaling.main(argv) == 0  # everything is there: nothing runs, nothing is appended
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2
