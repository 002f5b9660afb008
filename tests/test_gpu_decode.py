"""benchmarks/gpu_decode.py: Llama-3.1-8B's shape by default (checked on the meta device, no memory), and at a toy
size on the CPU every method's rows, with the bytes a step reads and the bandwidth share they imply, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import load_benchmark

gpu_decode = load_benchmark("gpu_decode")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

TOY = ["--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--hidden", "64",
       "--intermediate", "128", "--vocab", "256", "--budget", "32", "--chunk-size", "40", "--new-tokens", "4",
       "--device", "cpu"]  # fmt: skip


def test_the_default_model_is_llama_3_1_8b_in_bf16_at_32k_and_128k():
    args = gpu_decode.parse_args(["--device", "cpu"])
    assert args.lengths == [32768, 131072] and args.budget == 2048 and args.bandwidth_gbs == 4800.0
    assert args.methods.split(",") == [
        "snapkv", "pyramidkv", "h2o", "streamingllm", "nacl", "refreshkv", "infllm", "actqkv"
    ]  # fmt: skip
    model = gpu_decode.llama_shaped(args, torch.device("meta"))  # shapes only
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert next(model.parameters()).dtype == torch.bfloat16
    # a step reads every weight but the input embedding's 128256 x 4096 table (one row of it)
    assert gpu_decode.weight_bytes_per_step(model) == 2 * (8_030_261_248 - 128256 * 4096)
    # one K/V entry in 32 layers x 8 KV heads x 128 channels, keys and values, bf16: 128 KiB
    assert gpu_decode.kv_bytes_per_step(model, 2048.0) == 2048 * 32 * 8 * 128 * 2 * 2


def test_toy_rows_for_every_method_with_bytes_and_bandwidth_and_resume(tmp_path, capsys):
    args = gpu_decode.parse_args([*TOY, "--lengths", "96", "--out", str(tmp_path)])
    rows = gpu_decode.run(args)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["full", *gpu_decode.DEFAULT_METHODS.split(",")]
    # the full cache's 3 timed steps attend 97, 98, 99 entries; SnapKV's, of 32 kept, 33, 34, 35
    assert by["full"]["attended_per_step"] == 98.0 and by["snapkv"]["attended_per_step"] == 34.0
    weights = by["full"]["weight_bytes_per_step"]
    n_params = sum(p.numel() for p in gpu_decode.llama_shaped(args, torch.device("meta")).parameters())
    assert weights == 2 * (n_params - 256 * 64)  # bf16, the 256 x 64 input embedding not read
    entry = 2 * 2 * 16 * 2 * 2  # layers x KV heads x head_dim x (K, V) x bf16
    for r in rows:
        assert len(r["decode_ms_all"]) == 2 and r["decode_ms"] > 0 and r["prefill_s"] > 0
        assert r["bytes_per_step"] == weights + r["attended_per_step"] * entry
        assert r["bandwidth_fraction"] == pytest.approx(r["bytes_per_step"] / (r["decode_ms"] / 1e3) / 4.8e12)
        assert r["peak_bytes"] is None and r["prefill_peak_bytes"] is None  # CUDA only
        ms, full_ms = r["decode_ms_all"], by["full"]["decode_ms_all"]
        ratios = [f / m for f, m in zip(full_ms, ms)]  # paired within a repetition; two: their median is the mean
        assert r["speedup_over_full"] == pytest.approx(sum(ratios) / 2)
    # the floor: the full cache of a random prompt whose 3 steps attend as many entries as the method's: SnapKV's
    # 33-35 -> a prompt of 32; the full cache's own 97-99 -> a second full cache of 96 (a ratio near 1, as a check)
    assert by["snapkv"]["floor_tokens"] == 32 and by["full"]["floor_tokens"] == 96
    for r in rows:
        assert r["floor_decode_ms"] > 0 and r["floor_ratio"] > 0
    assert "| 96 | nacl |" in gpu_decode.table(rows)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == list(by)
    assert json.loads((tmp_path / "env.json").read_text())["args"]["layers"] == 2
    # a rerun skips the length already measured and appends nothing
    again = gpu_decode.run(args)
    assert (tmp_path / "rows.jsonl").read_text().splitlines() == lines and len(again) == len(rows)
    assert "already in" in capsys.readouterr().out


def test_cuda_without_cuda_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu_decode.parse_args(["--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device cuda asks for a CUDA device, but CUDA is not available" in capsys.readouterr().err
    assert gpu_decode.parse_args(["--device", "auto"]).device == "cpu"
