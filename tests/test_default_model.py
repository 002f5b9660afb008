"""The seam on the real default model (SmolLM2-135M-Instruct, fp32): exactness, the masked reference, the
negative control, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from helpers import greedy_with_logits, masked_reference, traces_of
from kvsieve.cli import main
from kvsieve.driver import cache_kwargs
from kvsieve.prompts import encode_prompt

pytestmark = pytest.mark.slow

N_NEW = 8
LOGIT_TOL = 1e-3  # fp32, sdpa vs masked sdpa over the same entries; measured ~4e-5


def passkey_text(n_repeats: int = 30, key: str = "71432") -> str:
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    at = n_repeats * 2 // 5
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return (
        "There is a pass key hidden in the following text. Find it.\n\n"
        + noise * at
        + needle
        + noise * (n_repeats - at)
    )


QUESTION = "What is the pass key? Answer with the number only."


@pytest.fixture(scope="module")
def prompt_ids(default_model):
    _, tok = default_model
    context, question = encode_prompt(tok, passkey_text(), QUESTION)
    return context, question


@pytest.mark.parametrize("name", ["full", "streamingllm", "snapkv", "h2o", "pyramidkv"])
def test_no_eviction_equals_model_generate(default_model, prompt_ids, name):
    model, tok = default_model
    context, question = prompt_ids
    ids = torch.tensor([context + question])
    reference = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=N_NEW,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        **cache_kwargs(model, DynamicCache(config=model.config)),
    )
    params = {} if name == "full" else {"budget": ids.shape[1] + N_NEW}
    out = kvsieve.generate(
        model, tok, ids[0].tolist(), method=kvsieve.method(name, **params), max_new_tokens=N_NEW, stop_at_eos=False
    )
    assert out.tokens == reference[0, ids.shape[1] :].tolist()


def test_full_cache_reads_the_passkey(default_model):
    model, tok = default_model
    out = kvsieve.generate(model, tok, passkey_text() + "\n\n" + QUESTION, max_new_tokens=16)
    assert "71432" in out.text


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "h2o"])
def test_compressed_equals_masked_reference(default_model, prompt_ids, name):
    model, _ = default_model
    context, question = prompt_ids
    ctx = context + question
    cache = kvsieve.SieveCache(model, kvsieve.method(name, budget=0.25), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW)
    assert all(layer.meter.stored_after_prefill == round(0.25 * len(ctx)) for layer in cache.sieve_layers)
    reference = masked_reference(model, traces_of(cache), ctx, tokens)
    assert (logits - reference).abs().max().item() < LOGIT_TOL


def test_question_chunk_after_compression_equals_masked_reference(default_model, prompt_ids):
    model, _ = default_model
    context, question = prompt_ids
    cache = kvsieve.SieveCache(model, kvsieve.method("snapkv", budget=0.3), trace=True)
    tokens, logits = greedy_with_logits(model, cache, context, N_NEW, question=question)
    reference = masked_reference(model, traces_of(cache), context, tokens, question=question)
    assert (logits - reference).abs().max().item() < LOGIT_TOL


def test_negative_control_is_caught_on_the_real_model(default_model, prompt_ids, monkeypatch):
    from kvsieve.cache import SieveLayer

    model, _ = default_model
    context, question = prompt_ids
    ctx = context + question
    monkeypatch.setattr(SieveLayer, "get_seq_length", lambda self: self.policy.stored_length())
    monkeypatch.setattr(SieveLayer, "get_mask_sizes", lambda self, q: (self.policy.stored_length() + q, 0))
    cache = kvsieve.SieveCache(model, kvsieve.method("snapkv", budget=0.25), trace=True)
    tokens, logits = greedy_with_logits(model, cache, ctx, N_NEW)
    reference = masked_reference(model, traces_of(cache), ctx, tokens)
    assert (logits[1:] - reference[1:]).abs().max().item() > 1.0


def test_cli_generate_json(default_model, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(passkey_text())
    code = main(
        [
            "generate",
            str(prompt),
            "--question",
            QUESTION,
            "--method",
            "snapkv",
            "--budget",
            "0.5",
            "--param",
            "window_size=16",
            "--max-new-tokens",
            "6",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    for key in (
        "text",
        "method",
        "budget",
        "prompt_tokens",
        "new_tokens",
        "kv_stored_tokens",
        "kv_bytes",
        "prefill_s",
        "decode_s_per_token",
    ):
        assert key in record, key
    assert record["method"] == "snapkv" and record["budget"] == 0.5
    assert record["params"]["window_size"] == 16
    assert record["kv_stored_tokens"] == round(0.5 * record["prompt_tokens"])
    # measured bytes: 30 layers x 3 KV heads x 64 dims x (K and V) x 4 bytes per stored entry
    assert record["kv_bytes"] == 30 * 3 * 64 * 2 * 4 * record["kv_stored_tokens"]
    assert 1 <= record["new_tokens"] <= 6


def test_cli_methods_lists_all_baselines():
    out = subprocess.run(
        [sys.executable, "-m", "kvsieve.cli", "methods", "--json"], capture_output=True, text=True, check=True
    )
    names = {m["name"] for m in json.loads(out.stdout)}
    assert {"full", "streamingllm", "snapkv", "h2o", "pyramidkv"} <= names


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "snapvk"], "unknown method 'snapvk'"),
        (["--method", "snapkv", "--budget", "0"], "budget must be >= 1"),
        (["--method", "snapkv", "--budget", "1.5"], "must be in (0, 1]"),
        (["--model", "someorg/some-model-7b"], "local directory"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there")
    assert main(["generate", str(prompt), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_empty_prompt(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("  \n")
    assert main(["generate", str(prompt)]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_bfloat16_full_cache_generates_what_model_generate_does(default_model):
    """In bfloat16 on a CPU kvsieve's decode steps take the grouped-matmul path (`ops.attention.decode_attention`),
    not sdpa: on a real prompt the greedy tokens are still plain ``model.generate``'s."""
    _, tok = default_model
    bf16, _ = kvsieve.load_model(dtype="bfloat16")
    ids = tok(passkey_text(), add_special_tokens=False)["input_ids"][:300]
    plain = bf16.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, cache=DynamicCache(config=bf16.config)
    )
    out = kvsieve.generate(bf16, tok, ids, method="full", max_new_tokens=12, chat=False, stop_at_eos=False)
    assert out.tokens == plain[0, len(ids) :].tolist()
