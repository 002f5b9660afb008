"""`kvsieve.generate` on a batch of prompts, for every registered method (`kvsieve.methods()`).

Each row's output -- its tokens, its stop reason and every statistic that is not a time (entries stored per layer
after compression, bytes, entries attended per step, each layer's policy statistics) -- equals what the prompt alone
gives, whatever the other rows' lengths: prompts alone, with a question per row (of different lengths), and
prefilled in chunks. Rows stop on their own (end of sequence), sampled rows draw what they draw alone, a fractional
budget is resolved from each row's own prompt.
"""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import IdTokenizer, random_ids, tiny_model
from test_conformance import NAMES, REAL_BUDGET, build, prompt_length

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (1.0, 0.55, 0.8)  # the rows' prompt lengths, as fractions of the method's test prompt
N_NEW = 6
TIMES = ("prefill_s", "decode_s_per_token")
STAT_TOL = 1e-5  # relative, for float statistics (an entropy, a similarity): batch matmuls of other shapes round
# differently in fp32; tokens, kept sets and counts are exact


def assert_close(ours, theirs, where: str = "") -> None:
    """Equal, floats within ``STAT_TOL``, recursively through dicts and lists."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=STAT_TOL, abs=STAT_TOL), where
    else:
        assert ours == theirs, where


def measured(out: kvsieve.GenerationOutput) -> dict:
    """Everything an output says except its times (a batch's times are the batch's)."""
    stats = {k: v for k, v in out.stats.to_dict().items() if k not in TIMES}
    return {"tokens": out.tokens, "stop_reason": out.stop_reason, "text": out.text, "stats": stats}


def assert_rows_equal_alone(outputs, model, prompts, questions, **kwargs) -> None:
    assert isinstance(outputs, list) and len(outputs) == len(prompts)
    eos = kwargs.pop("eos", None)
    for row, (prompt, question) in enumerate(zip(prompts, questions)):
        alone = kvsieve.generate(model, IdTokenizer(eos), prompt, question=question, **kwargs)
        assert_close(measured(outputs[row]), measured(alone), f"row {row}")


MODES = {
    "prompts": dict(questions=False, chunk_size=None),
    "questions": dict(questions=True, chunk_size=None),
    "chunked": dict(questions=True, chunk_size=24),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_every_row_equals_its_prompt_alone(arch_model, name, mode):
    method = build(name, REAL_BUDGET)
    n = prompt_length(method)
    prompts = [random_ids(int(n * f), seed=row + 1) for row, f in enumerate(LENGTHS)]
    questions = (
        [random_ids(3 + 2 * row, seed=10 + row) for row in range(len(prompts))]
        if MODES[mode]["questions"]
        else [None] * 3
    )
    kwargs = dict(method=method, max_new_tokens=N_NEW, chunk_size=MODES[mode]["chunk_size"])
    outputs = kvsieve.generate(
        arch_model, IdTokenizer(), prompts, question=questions if MODES[mode]["questions"] else None, **kwargs
    )
    assert_rows_equal_alone(outputs, arch_model, prompts, questions, **kwargs)


def test_a_row_stops_at_its_end_of_sequence_and_the_others_go_on():
    """Row 1 emits the model's end-of-sequence token (2) third: it stops there, is fed nothing after, and row 0
    goes on to ``max_new_tokens``, both as alone."""
    model = tiny_model("llama")
    prompts = [random_ids(40, seed=1), random_ids(25, seed=2)]
    kwargs = dict(method=build("h2o", 16), max_new_tokens=8)
    free = kvsieve.generate(model, IdTokenizer(), prompts, stop_at_eos=False, **kwargs)
    eos = model.generation_config.eos_token_id
    assert free[1].tokens[2] == eos and eos not in free[0].tokens
    outputs = kvsieve.generate(model, IdTokenizer(), prompts, **kwargs)
    assert outputs[0].tokens == free[0].tokens and outputs[0].stop_reason == "max_new_tokens"
    assert outputs[1].tokens == free[1].tokens[:3] and outputs[1].stop_reason == "eos"
    assert_rows_equal_alone(outputs, model, prompts, [None, None], **kwargs)


def test_sampled_rows_draw_what_they_draw_alone():
    model = tiny_model("llama")
    prompts = [random_ids(40, seed=1), random_ids(30, seed=2)]
    kwargs = dict(method=build("nacl", 16), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    outputs = kvsieve.generate(model, IdTokenizer(), prompts, **kwargs)
    assert_rows_equal_alone(outputs, model, prompts, [None, None], **kwargs)


def test_a_fractional_budget_is_resolved_for_each_rows_own_prompt():
    """InfLLM derives its block structure from the budget before any token is read: per row, from its length."""
    model = tiny_model("llama")
    prompts = [random_ids(160, seed=1), random_ids(64, seed=2)]
    method = kvsieve.method("infllm", budget=0.5, block_size=8, n_init=8, n_local=16)
    outputs = kvsieve.generate(model, IdTokenizer(), prompts, method=method, max_new_tokens=4)
    assert_rows_equal_alone(outputs, model, prompts, [None, None], method=method, max_new_tokens=4)
    assert outputs[0].stats.attended_per_step > outputs[1].stats.attended_per_step


def test_a_two_dimensional_tensor_is_a_batch_of_its_rows():
    model = tiny_model("llama")
    ids = torch.tensor([random_ids(30, seed=1), random_ids(30, seed=2)])
    outputs = kvsieve.generate(model, IdTokenizer(), ids, method=build("snapkv", 16), max_new_tokens=4)
    assert [o.tokens for o in outputs] == [
        kvsieve.generate(model, IdTokenizer(), row.tolist(), method=build("snapkv", 16), max_new_tokens=4).tokens
        for row in ids
    ]


def test_a_sliding_window_model_refuses_padding_inside_a_row_and_runs_the_rest():
    """Gemma 3's own sliding-window layers keep padded columns in their window: a question shorter than another
    row's would push real tokens out, so it is refused; prompts alone (left padding only) run exactly."""
    model = tiny_model("gemma3_text")
    prompts = [random_ids(60, seed=1), random_ids(35, seed=2)]
    kwargs = dict(method=build("snapkv", 16), max_new_tokens=4)
    assert_rows_equal_alone(
        kvsieve.generate(model, IdTokenizer(), prompts, **kwargs), model, prompts, [None] * 2, **kwargs
    )
    with pytest.raises(ValueError, match=r"batch row 0 would be padded after its first tokens.*sliding-window"):
        kvsieve.generate(model, IdTokenizer(), prompts, question=[[5, 6], [7, 8, 9]], **kwargs)


@pytest.mark.parametrize(
    ("question", "stream", "message"),
    [
        ([[5, 6]], None, r"question: 1 questions for a batch of 2 prompts, give one per prompt"),
        ([[5, 6], [7]], print, r"stream takes one prompt"),
        ([[5, 6], 7], None, r"question must be a string, token ids or a list of one per prompt"),
    ],
)
def test_a_batch_refuses_what_does_not_fit(question, stream, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kvsieve.generate(tiny_model("llama"), IdTokenizer(), [[5, 6, 7], [8, 9]], question=question, stream=stream)


DEFAULT_MODEL_METHODS = {  # one method of each kind, on the default model
    "one-shot eviction": ("snapkv", dict(budget=0.3)),
    "random sample": ("nacl", dict(budget=0.3)),
    "eviction at every step": ("h2o", dict(budget=0.3)),
    "two caches": ("refreshkv", dict(budget=0.2, stride=2)),
    "block retrieval": ("infllm", dict(budget=0.5, block_size=16, n_init=16, n_local=64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DEFAULT_MODEL_METHODS)
def test_rows_equal_alone_on_the_default_model(default_model, kind):
    """Three passages of different lengths through the chat template, each with its own question, greedy."""
    from importlib import resources

    model, tokenizer = default_model
    name, params = DEFAULT_MODEL_METHODS[kind]
    text = (resources.files("kvsieve") / "data" / "milton_paradise_lost.txt").read_text()[20_000:]
    prompts = [text[:2400], text[3000:4200], text[5000:6800]]
    questions = ["Who speaks first?", "Summarise this in one line.", "Which place is named?"]
    kwargs = dict(method=kvsieve.method(name, **params), max_new_tokens=8, chunk_size=160)
    outputs = kvsieve.generate(model, tokenizer, prompts, question=questions, **kwargs)
    for row, (prompt, question) in enumerate(zip(prompts, questions)):
        alone = kvsieve.generate(model, tokenizer, prompt, question=question, **kwargs)
        assert_close(measured(outputs[row]), measured(alone), f"{name} row {row}")
    assert len({o.stats.prompt_tokens for o in outputs}) == 3
