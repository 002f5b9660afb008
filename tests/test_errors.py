"""Bad input gets a clear error that names the parameter and what is allowed."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kvsieve
from helpers import tiny_model
from kvsieve.generate import cache_kwargs, encode_prompt


def test_unknown_method_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown method 'snapk'.*'snapkv'"):
        kvsieve.method("snapk")


def test_unknown_parameter_names_the_closest():
    with pytest.raises(ValueError, match=r"no parameter 'windowsize' \(did you mean 'window_size'\?\)"):
        kvsieve.method("snapkv", windowsize=8)


@pytest.mark.parametrize("budget", [0, -5])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValueError, match=r"budget must be >= 1"):
        kvsieve.method("snapkv", budget=budget)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.1, float("nan")])
def test_budget_fraction_must_be_in_unit_interval(budget):
    with pytest.raises(ValueError, match=r"budget as a fraction of the prompt must be in \(0, 1\]"):
        kvsieve.method("h2o", budget=budget)


@pytest.mark.parametrize("budget", [True, "0.2", None])
def test_budget_type(budget):
    with pytest.raises(TypeError, match="budget must be an int"):
        kvsieve.method("streamingllm", budget=budget)


def test_method_parameter_ranges():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        kvsieve.method("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match=r"recent_ratio must be in \[0.0, 1.0\]"):
        kvsieve.method("h2o", recent_ratio=1.5)
    with pytest.raises(ValueError, match="pooling must be one of"):
        kvsieve.method("pyramidkv", pooling="median")
    with pytest.raises(ValueError, match=r"n_sink must be in \[0, inf\]"):
        kvsieve.method("streamingllm", n_sink=-1)


def test_empty_prompt():
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(None, "   ")
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(None, [])


def test_generate_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, inf\]"):
        kvsieve.generate(model, None, [5, 6, 7], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0.0, 1.0\]"):
        kvsieve.generate(model, None, [5, 6, 7], top_p=0.0)


def test_unsupported_model():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(kvsieve.UnsupportedModelError, match=r"model type 'gpt2' is not supported.*llama"):
        kvsieve.SieveCache(model, kvsieve.method("full"))


def test_padded_batches_are_refused_not_silently_wrong():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    cache = kvsieve.SieveCache(model, kvsieve.method("snapkv", budget=6, window_size=2))
    with pytest.raises(NotImplementedError, match="padded batches"):
        model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=3, do_sample=False)


def test_methods_lists_the_baselines_with_defaults():
    infos = {info.name: info for info in kvsieve.methods()}
    assert {"full", "streamingllm", "snapkv", "h2o", "pyramidkv"} <= set(infos)
    assert infos["snapkv"].params == {
        "budget": 0.2,
        "window_size": 32,
        "kernel_size": 7,
        "pooling": "max",
        "gqa_reduce": "mean",
    }
    assert infos["pyramidkv"].params["window_size"] == 8
    assert all(info.summary and info.paper for info in infos.values())
