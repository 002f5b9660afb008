"""The evaluation runner on a tiny random-init Llama with the default model's tokenizer.

* A small sweep (two methods, two budgets, passkey and two-question kv_retrieval, lm, both modes) writes the run
  directory; its rows carry measured KV sizes at the budget, and its answers are those of `kvsieve.generate` run
  method by method (the shared prefill changes nothing).
* Interrupted runs -- an exception after N rows plus a torn last line, and a real SIGKILL of ``kvsieve eval`` --
  resume to exactly the rows of an uninterrupted run; rerunning a finished run does nothing.
* Lengths beyond the model's window give skip rows; bad inputs fail before any work with the close names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import kvsieve
from helpers import tiny_llama_for
from kvsieve.cli import main
from kvsieve.eval.config import EvalConfig
from kvsieve.eval.runner import TIMING_FIELDS, RunDirError, read_rows, run_eval, run_rows, summarize
from kvsieve.eval.tasks import DataFormatError, make_task, render
from kvsieve.methods.base import resolve_budget

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

WINDOW = 1024
SWEEP = {
    "model": "tiny-llama",
    "methods": ["snapkv", "streamingllm"],
    "budgets": [0.2, 0.5],
    "tasks": ["passkey", "kv_retrieval", "lm"],
    "task_options": {"kv_retrieval": {"n_questions": 2}},
    "lengths": [256, 2048],  # 2048 > the tiny model's window: skip rows
    "samples": 1,
    "depths": [0.5],
    "modes": ["query_aware", "query_agnostic"],
    "lm_continuation": 8,
    "max_new_tokens": 6,
}
RUNS = 5  # full + 2 methods x 2 budgets
# rows at 256: passkey 1 sample x 2 modes, kv_retrieval 1 sample x 2 questions x 2 modes, lm 1 document; at 2048
# no method can run, so no sample is built and each sample x mode gets one skip row
ROWS = RUNS * (2 + 4 + 1) + RUNS * (2 + 2 + 1)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_llama_for(smollm2_tokenizer, WINDOW), smollm2_tokenizer


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """The uninterrupted sweep that the other tests compare against."""
    model, tok = tiny
    out = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    groups = run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None)
    return out, groups, time.perf_counter() - start


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def test_sweep_writes_the_run_directory(reference_run):
    out, groups, _ = reference_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "env.json", "rows.jsonl", "summary.json"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["methods"] == ["full", "snapkv", "streamingllm"] and config["samples"] == 1
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["kvsieve"] == kvsieve.__version__
    assert env["model"]["max_position_embeddings"] == WINDOW and env["cpu_cores"] == os.cpu_count()
    rows = read_rows(out / "rows.jsonl")
    assert len(rows) == ROWS
    assert len({r["key"] for r in rows}) == len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["length"] for r in ok} == {256} and {r["length"] for r in skipped} == {2048}
    assert all("window of 1024" in r["reason"] for r in skipped)
    assert {(r["method"], r["budget"]) for r in ok} == {
        ("full", "-"),
        ("snapkv", "0.2"),
        ("snapkv", "0.5"),
        ("streamingllm", "0.2"),
        ("streamingllm", "0.5"),
    }
    assert {r["question"] for r in ok if r["task"] == "kv_retrieval"} == {0, 1}
    for row in ok:
        if row["task"] == "lm":
            assert row["mode"] == "lm" and row["new_tokens"] == 8 and row["ppl"] > 1
            assert row["score"] == row["top1_agreement"]
            if row["method"] == "full":
                assert row["kl"] == 0.0 and row["top1_agreement"] == 1.0
            else:
                assert row["kl"] > 0.0
            continue
        assert 0.0 <= row["score"] <= 1.0 and row["metric"] in ("first_int_match", "kv_retrieval")
        assert 1 <= row["new_tokens"] <= 6 and row["prefill_s"] > 0
        # measured sizes: exactly the budget of the compressed prompt (the question after it in query-agnostic use)
        prompt = row["prompt_tokens"] + (row["question_tokens"] if row["mode"] == "query_aware" else 0)
        expected = prompt if row["method"] == "full" else resolve_budget(float(row["budget"]), prompt)
        assert row["kv_stored_tokens"] == expected, row["key"]
        assert row["kv_bytes"] == row["kv_bytes_full"] * expected // prompt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == len(rows) and summary["skipped"] == len(skipped)
    assert summary["groups"] == groups == summarize(rows)
    full_groups = [g for g in groups if g["method"] == "full" and g["n"]]
    assert all(g["retention"] in (1.0, None) for g in full_groups)


def test_answers_equal_generate_method_by_method(reference_run, tiny):
    """The runner's shared prefill, question copies and decoding give exactly what kvsieve.generate gives."""
    model, tok = tiny
    out, _, _ = reference_run
    rows = [r for r in read_rows(out / "rows.jsonl") if r["status"] == "ok" and r["task"] == "kv_retrieval"]
    sample = make_task("kv_retrieval", tok, length=256, n_samples=1, depths=[0.5], n_questions=2)[0]
    for row in rows:
        context, question = render(sample, row["question"], tok).encode(tok)
        method = kvsieve.method(row["method"], **row["params"])
        if row["mode"] == "query_aware":
            out_ = kvsieve.generate(model, tok, context + question, method=method, max_new_tokens=6)
        else:
            out_ = kvsieve.generate(model, tok, context, method=method, question=question, max_new_tokens=6)
        assert row["prediction"] == out_.text, row["key"]
        assert row["kv_bytes"] == out_.stats.kv_bytes, row["key"]


def test_interrupted_run_resumes_to_the_same_rows(reference_run, tiny, tmp_path):
    model, tok = tiny
    reference = read_rows(reference_run[0] / "rows.jsonl")

    class Stop(Exception):
        pass

    def stop_after(n):
        seen = []

        def on_row(row):
            seen.append(row["key"])
            if len(seen) == n:
                raise Stop

        return on_row

    out = tmp_path / "run"
    with pytest.raises(Stop):
        run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None, on_row=stop_after(12))
    assert len(read_rows(out / "rows.jsonl")) == 12
    assert not json.loads((out / "summary.json").read_text())["complete"]
    with (out / "rows.jsonl").open("ab") as handle:  # a write torn by a kill
        handle.write(b'{"key": "passkey|L256|torn')
    with pytest.raises(Stop):  # a second interruption, inside another sample
        run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None, on_row=stop_after(9))
    assert len(read_rows(out / "rows.jsonl")) == 21
    run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None)
    resumed = read_rows(out / "rows.jsonl")
    assert without_timings(resumed) == without_timings(reference)
    assert json.loads((out / "summary.json").read_text())["complete"]

    # a finished run does nothing: no model is even loaded (this name cannot be loaded), no byte changes
    before = (out / "rows.jsonl").read_bytes()
    unloadable = dict(SWEEP)
    run_eval(unloadable, out, progress=False, echo=None)
    assert (out / "rows.jsonl").read_bytes() == before


def test_shards_split_the_units_and_together_equal_one_run(reference_run, tiny, tmp_path):
    """Three shards (one interrupted, then resumed without shards) write the rows of the unsharded run."""
    model, tok = tiny
    reference = {r["key"]: r for r in without_timings(read_rows(reference_run[0] / "rows.jsonl"))}
    out = tmp_path / "run"
    run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None, shard="0/3")
    run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None, shard=(2, 3))
    files = sorted(p.name for p in out.glob("rows*.jsonl"))
    assert files == ["rows.shard-0-of-3.jsonl", "rows.shard-2-of-3.jsonl"]
    first, third = (read_rows(out / name) for name in files)
    assert first and third and not {r["key"] for r in first} & {r["key"] for r in third}
    assert not json.loads((out / "summary.json").read_text())["complete"]  # shard 1 has not run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["elapsed_s_by_writer"]) == {"shard-0-of-3", "shard-2-of-3"}
    assert summary["elapsed_s"] == pytest.approx(sum(summary["elapsed_s_by_writer"].values()))
    run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None)  # the rest, unsharded
    rows = run_rows(out)
    assert {r["key"]: r for r in without_timings(rows)} == reference and len(rows) == len(reference)
    assert len(read_rows(out / "rows.jsonl")) == len(reference) - len(first) - len(third)
    assert json.loads((out / "summary.json").read_text())["complete"]
    assert run_eval(SWEEP, out, model=model, tokenizer=tok, progress=False, echo=None, shard="1/3")  # nothing to do
    assert len(run_rows(out)) == len(reference)
    for bad in ("3/3", "1", "a/b", (-1, 2), 3):
        with pytest.raises(ValueError, match=rf"shard must be K/N .* got {re.escape(repr(bad))}$"):
            run_eval(SWEEP, tmp_path / "bad", model=model, tokenizer=tok, progress=False, echo=None, shard=bad)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install ray)")
def test_ray_workers_write_the_rows_of_one_run(reference_run, tiny, tmp_path, monkeypatch):
    """``kvsieve eval --workers 2``: two Ray tasks on a local cluster, each loading the saved model."""
    model, tok = tiny
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in SWEEP.items() if k != "model"}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    args = ["eval", "--config", str(config), "--model", str(model_dir), "--out", str(out), "--workers", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("rows*.jsonl")) == ["rows.shard-0-of-2.jsonl", "rows.shard-1-of-2.jsonl"]
    rows = without_timings(run_rows(out))
    reference = without_timings(read_rows(reference_run[0] / "rows.jsonl"))
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(reference) and by_key.keys() == {r["key"] for r in reference}
    for expected in reference:  # another process: perplexity and KL to float precision, the rest exactly
        got = by_key[expected["key"]]
        for field, value in expected.items():
            if field in ("ppl", "nll", "kl"):
                assert got[field] == pytest.approx(value, rel=1e-5, abs=1e-6), (expected["key"], field)
            else:
                assert got[field] == value, (expected["key"], field)
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_killed_cli_run_resumes(reference_run, tiny, tmp_path):
    """SIGKILL of ``kvsieve eval`` after some rows, then the same command again."""
    model, tok = tiny
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in SWEEP.items() if k not in ("model", "samples")}))
    # three samples per cell (the reference has one): enough work that the kill lands mid-run
    args = ["eval", "--config", str(config), "--model", str(model_dir), "--samples", "3", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    child = subprocess.Popen([sys.executable, "-m", "kvsieve.cli", *args, "--no-progress"], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if (out / "rows.jsonl").exists() and (out / "rows.jsonl").read_bytes().count(b"\n") >= 15:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the run finished (or failed) before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    partial = read_rows(out / "rows.jsonl")
    assert 15 <= len(partial) < 3 * ROWS
    # the summary of the samples finished before the kill, with the time they took, survives SIGKILL
    killed = json.loads((out / "summary.json").read_text())
    assert not killed["complete"] and 0 < killed["rows"] <= len(partial) and killed["elapsed_s"] > 0
    assert main([*args, "--no-progress"]) == 0
    rows = read_rows(out / "rows.jsonl")
    assert len(rows) == 3 * ROWS and len({r["key"] for r in rows}) == len(rows)
    finished = json.loads((out / "summary.json").read_text())
    assert finished["complete"] and finished["elapsed_s"] > killed["elapsed_s"]  # the resumed run adds its time
    assert without_timings(rows[: len(partial)]) == without_timings(partial)
    # Sample i does not depend on how many are drawn, and the weights went through save/load unchanged: the rows
    # of the first samples are the in-memory reference run's. Another process may sum in another order (thread
    # set-up), so perplexity and KL match to float precision; everything else exactly.
    by_key = {r["key"]: r for r in without_timings(rows)}
    for expected in without_timings(read_rows(reference_run[0] / "rows.jsonl")):
        got = by_key[expected["key"]]
        assert got.keys() == expected.keys()
        for field, value in expected.items():
            if field in ("ppl", "nll", "kl"):
                assert got[field] == pytest.approx(value, rel=1e-5, abs=1e-6), (expected["key"], field)
            else:
                assert got[field] == value, (expected["key"], field)


def test_a_method_that_extrapolates_runs_beyond_the_window(tiny, tmp_path, monkeypatch):
    from kvsieve.methods.streamingllm import StreamingLLM

    monkeypatch.setattr(StreamingLLM, "extrapolates", True)
    model, tok = tiny
    config = dict(SWEEP, tasks=["passkey"], lengths=[1030], modes=["query_agnostic"], budgets=[64])
    run_eval(config, tmp_path, model=model, tokenizer=tok, progress=False, echo=None)
    rows = {r["method"]: r for r in read_rows(tmp_path / "rows.jsonl")}
    assert rows["streamingllm"]["status"] == "ok" and rows["streamingllm"]["kv_stored_tokens"] == 64
    for name in ("full", "snapkv"):  # prompt + new tokens are measured per sample
        assert rows[name]["status"] == "skipped" and "window of 1024" in rows[name]["reason"]
        assert rows[name]["prompt_tokens"] + 6 > WINDOW


def test_different_config_refuses_to_resume(reference_run, tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "run"
    small = dict(SWEEP, tasks=["passkey"], lengths=[256], methods=["snapkv"], budgets=[0.5])
    run_eval(small, out, model=model, tokenizer=tok, progress=False, echo=None)
    with pytest.raises(RunDirError, match=r"different configuration \(samples: 1 -> 2\)"):
        run_eval(dict(small, samples=2), out, model=model, tokenizer=tok, progress=False, echo=None)
    run_eval(dict(small, samples=2), out, model=model, tokenizer=tok, progress=False, echo=None, force=True)
    assert len(read_rows(out / "rows.jsonl")) == 2 * 2 * 2  # 2 samples x 2 modes x (full, snapkv)
    assert len(list(out.glob("rows.jsonl.replaced-*"))) == 1


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"tasks": ["paskey"]}, ValueError, "unknown task 'paskey'; closest: passkey"),
        ({"metrics": {"passkey": "first_int_mach"}}, ValueError, "unknown metric 'first_int_mach'.*first_int_match"),
        ({"methods": ["snapvk"]}, ValueError, "unknown method 'snapvk'. Did you mean 'snapkv'"),
        ({"params": {"snapkv": {"windw_size": 4}}}, ValueError, "did you mean 'window_size'"),
        ({"modes": ["query_awre"]}, ValueError, "unknown mode 'query_awre'; closest: query_aware"),
        ({"budgets": [1.5]}, ValueError, r"fraction of the prompt must be in \(0, 1\]"),
        (
            {"methods": ["infllm"], "params": {"infllm": {"n_local": 4096}}},
            ValueError,
            r"method infllm at length \d+: budget=0.2 of a \d+-token prompt",
        ),
        ({"methods": ["infllm"], "budgets": [7]}, ValueError, "method infllm does not take budget 7"),
        ({"samplez": 3}, ValueError, "unknown setting.*'samplez' \\(closest: samples\\)"),
        ({"data": ["/nonexistent/file.jsonl"]}, FileNotFoundError, "not found"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, change, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        run_eval(dict(SWEEP, **change), out, progress=False, echo=None)
    assert not out.exists()


def test_malformed_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "passkey.jsonl"
    good = {"id": 0, "context": "noise", "input": "What is the pass key?", "answer": ["12345"]}
    data.write_text(json.dumps(good) + "\n" + '{"id": 1, "context": "x"\n')
    out = tmp_path / "run"
    with pytest.raises(DataFormatError, match=rf"{data.name}:2: invalid JSON"):
        run_eval(dict(SWEEP, tasks=[], data=[str(data)]), out, progress=False, echo=None)
    assert not out.exists()
    # the command line prints the same one line, exit status 2
    assert main(["eval", "--data", str(data), "--tasks", "passkey", "--out", str(out), "--no-progress"]) == 2


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"methods": ["snapkv"], "samples": 3, "params": {"snapkv": {"window_size": 8}}}))
    config = EvalConfig.load(path, {"samples": 2, "params": {"snapkv": {"kernel_size": 3}}, "seed": None})
    assert config.samples == 2 and config.seed == 0
    assert config.params == {"snapkv": {"window_size": 8, "kernel_size": 3}}
    runs = config.validate()
    assert [(r.name, r.label) for r in runs] == [("full", "-"), ("snapkv", "0.2")]
    assert runs[1].method.window_size == 8 and runs[1].method.kernel_size == 3
    assert main(["eval", "--param", "window_size=8", "--out", str(tmp_path / "x")]) == 2
    assert "--param for eval expects METHOD.KEY=VALUE" in capsys.readouterr().err


def test_without_shared_prefill_the_rows_are_the_same(reference_run, tiny, tmp_path):
    model, tok = tiny
    small = dict(SWEEP, tasks=["kv_retrieval", "lm"], lengths=[256])
    shared_dir, alone_dir = tmp_path / "shared", tmp_path / "alone"
    run_eval(small, shared_dir, model=model, tokenizer=tok, progress=False, echo=None)
    run_eval(dict(small, share_prefill=False), alone_dir, model=model, tokenizer=tok, progress=False, echo=None)
    shared, alone = read_rows(shared_dir / "rows.jsonl"), read_rows(alone_dir / "rows.jsonl")
    assert any(r["shared_prefill"] for r in shared) and not any(r["shared_prefill"] for r in alone)
    strip = (*TIMING_FIELDS, "shared_prefill")
    assert [{k: v for k, v in r.items() if k not in strip} for r in shared] == [
        {k: v for k, v in r.items() if k not in strip} for r in alone
    ]


def test_benchmark_files(tiny, tmp_path):
    from eval_fixtures import DATA_DIR

    model, tok = tiny
    files = [
        str(DATA_DIR / "infinitebench" / "passkey.jsonl"),
        str(DATA_DIR / "ruler" / "niah_single_1" / "validation.jsonl"),
    ]
    config = dict(SWEEP, tasks=[], data=files, lengths=[512], samples=2, budgets=[16], modes=["query_agnostic"])
    run_eval(config, tmp_path, model=model, tokenizer=tok, progress=False, echo=None)
    rows = read_rows(tmp_path / "rows.jsonl")
    assert len(rows) == 2 * 2 * 3  # two files x two samples x (full, snapkv@16, streamingllm@16)
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("infinitebench/passkey", "first_int_match"),
        ("ruler/niah_single_1", "string_match_all"),
    }
    assert all(r["status"] == "ok" and r["depth"] is None for r in rows)
    assert all(r["kv_stored_tokens"] == min(16, r["prompt_tokens"]) for r in rows if r["method"] != "full")
