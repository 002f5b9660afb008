"""The command line explains itself and fails in one line: --version, help with defaults, methods and tasks that
say what they mean, and the errors a first hour produces (a directory or non-UTF-8 file as the prompt, a terminal
on standard input, Ctrl-C, a closed pipe, a run directory that is a file, a half-made run directory).

Everything runs in-process through `kvsieve.cli.main`; a tiny random-init Llama over the default tokenizer stands
in for a model where one is needed."""

from __future__ import annotations

import argparse
import io
import json

import pytest

import kvsieve
from helpers import tiny_llama_for
from kvsieve.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def tiny_dir(smollm2_tokenizer, tmp_path_factory):
    """A checkpoint directory of a tiny Llama (window 512) with the default model's tokenizer: loads in < 1 s."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama_for(smollm2_tokenizer, 512).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The pass key is 31415. Remember it. " * 4)
    return path


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"kvsieve {kvsieve.__version__} (python ")


def test_every_help_shows_its_defaults():
    from kvsieve.cli.common import HelpFormatter

    missing = []
    for name, parser in subcommands().items():
        formatter = HelpFormatter(name)
        for action in parser._actions:
            default = action.default
            unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
            if action.option_strings and not unset and "default" not in formatter._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing
    helps = {name: " ".join(parser.format_help().split()) for name, parser in subcommands().items()}
    assert "(default: 64)" in helps["generate"] and "(default: 0.0)" in helps["generate"]
    assert "(default: 3)" in helps["bench"] and "(default: snapkv)" in helps["bench"]
    assert "(default: 5)" in helps["eval"] and "(default: passkey" in helps["eval"]  # EvalConfig's, not None
    assert "(default: report.html)" in helps["report"]


def test_methods_say_what_the_budget_counts_and_what_parameters_mean(capsys):
    assert main(["methods", "snapkv", "refreshkv", "full", "snapkv-w1"]) == 0
    out = capsys.readouterr().out
    assert "budget: entries stored per layer and KV head after the prompt" in out
    assert "budget: entries a partial decode step attends (K)" in out
    assert "window_size=32" in out and "last prompt queries whose attention scores the prefix" in out
    assert "full  [-]" in out and "budget: none" in out
    assert "preset of snapkv (parameters as there): window_size=1, gqa_reduce='max'" in out
    assert main(["methods", "--json"]) == 0
    infos = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert infos["h2o"]["param_help"]["recent_ratio"] and infos["h2o"]["budget_counts"]
    assert infos["snapkv"]["params"]["window_size"] == 32  # the old keys stay
    assert main(["methods", "snapvk"]) == 2 and "Did you mean 'snapkv'" in capsys.readouterr().err


def test_tasks_say_what_they_measure_and_their_options(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "passkey  [infinitebench]" in out and "metric first_int_match:" in out
    assert "options: max_new_tokens=50, n_questions=1" in out  # kv_retrieval
    assert "lm  [public-domain text]" in out and "lm_continuation=128" in out
    assert main(["tasks", "--json"]) == 0
    tasks = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert tasks["vt"]["options"]["num_hops"] == 4 and not tasks["vt"]["needle_depths"]


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["methods", "--json"]) == 141  # as `yes | head` (128 + SIGPIPE)
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_generate(prompt_file, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kvsieve, "load_model", interrupted)
    try:
        code = main(["generate", str(prompt_file)])
    except KeyboardInterrupt:  # caught here, or it would stop the test session
        pytest.fail("KeyboardInterrupt escaped kvsieve generate as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "kvsieve generate: interrupted" in err and "Traceback" not in err


def test_prompt_file_that_is_a_directory_or_not_utf8(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert f"prompt_file {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert main(["generate", str(latin)]) == 2
    err = capsys.readouterr().err
    assert f"prompt_file {str(latin)!r} is not UTF-8 text (byte 0xe9 at offset 3)" in err
    assert main(["generate", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_no_prompt_at_a_terminal_is_refused_not_waited_on(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

        def read(self, *args):
            raise AssertionError("read standard input at a terminal")

    monkeypatch.setattr("sys.stdin", Terminal())
    assert main(["generate", "--question", "What is the pass key?"]) == 2
    assert "standard input is a terminal, so kvsieve does not wait on it" in capsys.readouterr().err


def test_full_takes_no_budget_on_the_command_line(prompt_file, capsys):
    assert main(["generate", str(prompt_file), "--method", "full", "--budget", "100"]) == 2
    err = capsys.readouterr().err
    assert "method 'full' takes no parameters (got 'budget')" in err and "its parameters are: " not in err


def test_generate_json_says_model_device_and_why_it_stopped_and_notes_a_budget_that_evicts_nothing(
    tiny_dir, prompt_file, capsys
):
    args = ["generate", str(prompt_file), "--model", str(tiny_dir), "--method", "snapkv", "--budget", "5000",
            "--max-new-tokens", "3", "--no-chat", "--json"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["model"] == str(tiny_dir) and record["dtype"] == "float32" and record["device"] == "cpu"
    assert record["stop_reason"] in ("eos", "max_new_tokens") and 1 <= record["new_tokens"] <= 3
    assert record["stop_reason"] == "max_new_tokens" or record["new_tokens"] < 3
    n = record["prompt_tokens"]
    assert f"budget 5000 >= the prompt's {n} tokens: nothing of the prompt is evicted" in captured.err
    assert record["notes"] and record["kv_stored_tokens"] == n
    assert main([*args[:-3], "1", "--budget", "8", "--json"]) == 0  # a real budget: no note
    assert "note:" not in capsys.readouterr().err


def test_generate_repeated_question_compresses_once_and_answers_each_as_alone(tiny_dir, prompt_file, capsys):
    common = ["generate", str(prompt_file), "--model", str(tiny_dir), "--method", "snapkv", "--budget", "8",
              "--max-new-tokens", "4", "--json"]  # fmt: skip
    questions = ["What is the pass key?", "Who wrote it?"]
    assert main([*common, "--question", questions[0], "--question", questions[1]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in records] == questions
    for question, record in zip(questions, records):
        assert main([*common, "--question", question]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert record["tokens"] == alone["tokens"] and record["kv_stored_tokens"] == alone["kv_stored_tokens"]
        assert record["question_tokens"] == alone["question_tokens"] > 0
    assert main([*common[:-1], "--question", questions[0], "--question", questions[1]]) == 0
    err = capsys.readouterr().err
    assert "[question 1 of 2: What is the pass key?]" in err and "[question 2 of 2: Who wrote it?]" in err


def test_eval_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken.txt"
    out.write_text("not a run directory")
    assert main(["eval", "--out", str(out), "--no-progress"]) == 2
    assert f"run directory {str(out)!r} is an existing file" in capsys.readouterr().err


def test_eval_that_fails_leaves_no_run_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_dir), "--lengths", "50", "--samples", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert "length=50 is too small for task passkey" in capsys.readouterr().err
    assert not out.exists()


def test_eval_prints_why_rows_were_skipped(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_dir), "--lengths", "1024", "--samples", "1", "--modes", "query_aware",
            "--methods", "snapkv", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "0 (+1 skipped)" in printed
    assert "note: 2 rows skipped (passkey; full, snapkv): 1024 positions exceed the model's window of 512" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert all("window of 512" in next(iter(g["skip_reasons"])) for g in summary["groups"])


def test_eval_data_alone_runs_only_the_data(tmp_path):
    from eval_fixtures import DATA_DIR
    from kvsieve.eval.config import EvalConfig

    data = str(DATA_DIR / "infinitebench" / "passkey.jsonl")
    assert EvalConfig.load(None, {"data": [data]}).tasks == []
    assert EvalConfig.load(None, {"data": [data], "tasks": ["vt"]}).tasks == ["vt"]
    assert EvalConfig.load(None, {}).tasks == ["passkey"]


def test_report_out_that_is_a_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert f"out {str(tmp_path)!r} is a directory: give the file to write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --device
@pytest.fixture(scope="module")
def tiny_long_dir(smollm2_tokenizer, tmp_path_factory):
    """As `tiny_dir`, with a window that holds the demo's document."""
    path = tmp_path_factory.mktemp("tiny-long")
    tiny_llama_for(smollm2_tokenizer, 8192).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_device_cpu_works_for_generate_bench_and_demo(tiny_dir, tiny_long_dir, prompt_file, capsys):
    generate = ["generate", str(prompt_file), "--model", str(tiny_dir), "--method", "snapkv", "--budget", "8",
                "--max-new-tokens", "2", "--no-chat", "--json", "--device", "cpu"]  # fmt: skip
    assert main(generate) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    bench = ["bench", "--model", str(tiny_dir), "--methods", "snapkv", "--budgets", "8", "--lengths", "64",
             "--new-tokens", "2", "--repeats", "1", "--no-progress", "--json", "--device", "cpu"]  # fmt: skip
    assert main(bench) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["env"]["model"]["device"] == "cpu" and record["args"]["device"] == "cpu"
    assert {row["method"] for row in record["rows"]} == {"full", "snapkv"}
    demo = ["demo", "--model", str(tiny_long_dir), "--methods", "snapkv", "--budget", "64", "--max-new-tokens", "2",
            "--device", "cpu"]  # fmt: skip
    assert main(demo) == 0
    out = capsys.readouterr().out
    assert "float32 on cpu" in out and "snapkv (64)" in out


def test_eval_device_is_recorded_and_a_run_resumes_on_another_device(tiny_dir, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_dir), "--lengths", "256", "--samples", "1", "--modes", "query_aware",
            "--methods", "snapkv", "--budgets", "32", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--device", "cpu"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["device"] == "cpu"
    rows = (out / "rows.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--device", "auto"]) == 0  # the device is no part of the run's identity
    assert "already holds this finished run" in capsys.readouterr().out
    assert (out / "rows.jsonl").read_text() == rows
    assert main([*args, "--dtype", "bfloat16"]) == 2  # the dtype is
    assert "different configuration (dtype: 'float32' -> 'bfloat16')" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "bench", "demo", "eval"])
def test_device_cuda_without_cuda_is_one_line_and_status_2(
    command, tiny_dir, prompt_file, tmp_path, monkeypatch, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    argv = {
        "generate": ["generate", str(prompt_file), "--model", str(tiny_dir), "--device", "cuda"],
        "bench": ["bench", "--model", str(tiny_dir), "--lengths", "64", "--device", "cuda"],
        "demo": ["demo", "--model", str(tiny_dir), "--device", "cuda:0"],
        "eval": ["eval", "--model", str(tiny_dir), "--lengths", "256", "--out", str(out), "--device", "cuda"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvsieve: error: ") and "Traceback" not in err, err
    assert "asks for a CUDA device, but CUDA is not available (torch " in err
    assert "use --device cpu or --device auto" in err or "use device='cpu' or 'auto'" in err
    assert not out.exists()


def test_a_device_that_is_no_device_is_named(tiny_dir, prompt_file, capsys):
    assert main(["generate", str(prompt_file), "--model", str(tiny_dir), "--device", "gpu"]) == 2
    assert "--device must be cpu, cuda, cuda:N or auto; got 'gpu'" in capsys.readouterr().err
