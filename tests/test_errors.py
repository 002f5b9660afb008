"""Bad input gets a clear error that names the parameter and what is allowed."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kvsieve
from helpers import tiny_model
from kvsieve.driver import cache_kwargs
from kvsieve.prompts import encode_prompt


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


def test_a_batch_row_of_padding_only_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0] = 0  # nothing but padding: no prompt to compress
    cache = kvsieve.SieveCache(model, kvsieve.method("snapkv", budget=6, window_size=2))
    with pytest.raises(ValueError, match="batch row 0 has no token to complete its prompt with"):
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))


def test_methods_lists_the_baselines_with_defaults():
    infos = {info.name: info for info in kvsieve.methods()}
    assert {"full", "streamingllm", "snapkv", "h2o", "pyramidkv"} <= set(infos)
    assert infos["snapkv"].params == {
        "budget": 0.2,
        "rolling": False,
        "layer_schedule": "uniform",
        "window_size": 32,
        "kernel_size": 7,
        "pooling": "max",
        "gqa_reduce": "mean",
    }
    assert infos["pyramidkv"].params["window_size"] == 8
    assert all(info.summary and info.paper for info in infos.values())


# ---------------------------------------------------------------------------------- issue 16: errors, not tracebacks
def test_method_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"method name must be a string, one of: .*snapkv.*; got None"):
        kvsieve.method(None)


def test_full_takes_no_budget():
    with pytest.raises(ValueError, match=r"method 'full' takes no parameters \(got 'budget'\).*no budget"):
        kvsieve.method("full", budget=100)


def test_sieve_cache_takes_a_method_name():
    model = tiny_model("llama")
    cache = kvsieve.SieveCache(model, "snapkv")
    assert cache.method.name == "snapkv" and cache.method.budget == kvsieve.method("snapkv").budget
    assert kvsieve.SieveCache(model).method.name == "full"
    with pytest.raises(TypeError, match=r"method must be a kvsieve Method .*a method name or None.*got int"):
        kvsieve.SieveCache(model, 5)


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        (None, TypeError, r"prompt must be a string, a list of token ids, a list of chat messages .*got None"),
        ([[5, 6], [7, "x"]], ValueError, r"list of sequences \(a batch\?\).*a batch is a list of such prompts"),
        (torch.tensor([[[5, 6]]]), ValueError, r"tensor of shape \[1, 1, 2\].*or a 2-D tensor"),
        ([5, 6.5], TypeError, r"token ids must be ints, got 6.5"),
    ],
)
def test_generate_refuses_what_is_not_one_prompt(prompt, error, message):
    from helpers import IdTokenizer

    with pytest.raises(error, match=message):
        kvsieve.generate(tiny_model("llama"), IdTokenizer(), prompt, max_new_tokens=2)


def test_generate_needs_the_tokenizer():
    with pytest.raises(TypeError, match=r"tokenizer must be the model's tokenizer .*got NoneType"):
        kvsieve.generate(tiny_model("llama"), None, [5, 6, 7])
    with pytest.raises(TypeError, match=r"model must be a transformers causal LM .*got str"):
        kvsieve.generate("smollm2-135m", None, [5, 6, 7])


def test_why_generation_stopped():
    from helpers import IdTokenizer

    model = tiny_model("llama")
    out = kvsieve.generate(model, IdTokenizer(), [5, 6, 7, 8], max_new_tokens=4)
    assert out.stop_reason == "max_new_tokens" and len(out.tokens) == 4
    early = kvsieve.generate(model, IdTokenizer(eos=out.tokens[1]), [5, 6, 7, 8], max_new_tokens=4)
    assert early.stop_reason == "eos" and early.tokens == out.tokens[:2]


def test_a_conversation_is_one_prompt_through_the_chat_template(smollm2_tokenizer):
    from helpers import IdTokenizer

    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "The pass key is 31415. Remember it."}]
    ids, question = encode_prompt(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert question == [] and ids == tok(text, add_special_tokens=False)["input_ids"]
    # with a question, split like a string prompt: the same tokens as the one-string form
    assert encode_prompt(tok, messages, "What is the pass key?") == encode_prompt(
        tok, messages[0]["content"], "What is the pass key?"
    )
    with pytest.raises(ValueError, match="needs the tokenizer's chat template, and this tokenizer has none"):
        encode_prompt(IdTokenizer(), messages)
    with pytest.raises(ValueError, match=r"prompt message 0 must be \{'role': str, 'content': str\}"):
        encode_prompt(tok, [{"role": "user", "text": "hi"}])


@pytest.fixture
def checkpoint(tmp_path, smollm2_tokenizer):
    """A complete checkpoint directory: a tiny Llama's weights and config, and a tokenizer."""
    tiny_model("llama").save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_device_map_cuda_without_cuda(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device_map in ("cuda", "cuda:0", {"": 0}):
        with pytest.raises(ValueError, match=r"device_map=.* asks for a CUDA device, but CUDA is not available"):
            kvsieve.load_model(checkpoint, device_map=device_map)


def test_truncated_safetensors_is_named(checkpoint):
    from kvsieve.models import ModelIntegrityError

    weights = checkpoint / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(
        ModelIntegrityError, match=r"model\.safetensors' is not a readable safetensors file .*truncated"
    ):
        kvsieve.load_model(checkpoint)


def test_every_method_says_what_its_budget_counts_and_what_its_parameters_mean():
    for info in kvsieve.methods():
        if info.name == "full":
            assert info.budget_counts == "" and info.params == {}
            continue
        counts = info.budget_counts
        assert "stored" in counts or "attends" in counts, info.name
        missing = [name for name, text in info.param_help.items() if not text]
        assert not missing and set(info.param_help) == set(info.params), (info.name, missing)
    infos = {info.name: info for info in kvsieve.methods()}
    assert "stored" in infos["snapkv"].budget_counts and "attends" in infos["refreshkv"].budget_counts
    assert infos["pyramidkv"].param_help["window_size"] and infos["snapkv-w1"].preset_of == "snapkv"
    assert infos["snapkv-w1"].preset_params == {"window_size": 1, "gqa_reduce": "max"}
