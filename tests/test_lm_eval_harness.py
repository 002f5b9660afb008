"""``--model kvsieve`` for lm-evaluation-harness: each request type over a compressed cache, on a tiny local model
and local task files (no hub, no network).

The reference for ``method=full`` (and a budget that evicts nothing) is lm-eval's own ``hf`` model on the same
directory: fp32 sums of log-probs agree within ``ATOL`` (kvsieve feeds the continuation token by token, ``hf`` in
one forward). Compressing methods are checked against a computation written here with kvsieve's API.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install 'kvsieve[lm-eval]'")

import yaml
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import kvsieve
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.lm_eval_harness import KVSieveLM, KVSieveLMError
from kvsieve.lm_eval_harness.__main__ import main
from kvsieve.methods.base import Phase

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # fp32, summed over a few tokens
WINDOW = 64  # the tiny model's max_position_embeddings: lm-eval's max_length
WORDS = [f"w{i:02d}" for i in range(37)]  # one width: no word is a prefix of another (stop strings)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init Llama over a word-level tokenizer (BOS added), saved like any HF checkpoint."""
    path = tmp_path_factory.mktemp("tiny_lm")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=WINDOW,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu")


def text(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + 7 * i) % len(WORDS)] for i in range(n))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LL_ARGS = [
    (text(20), " " + text(3, 5)),  # two continuations of one context share its cache
    (text(20), " " + text(1, 9)),
    (text(20), " " + text(4, 2)),
    ("", text(5, 3)),  # empty context: lm-eval's prefix token
    (text(90), " " + text(2, 1)),  # longer than max_length: left-truncated like hf
]


# ------------------------------------------------------------------------------------------ registration
def test_registered_as_lm_eval_model_type():
    from lm_eval.api.registry import get_model

    assert get_model("kvsieve") is KVSieveLM


# ------------------------------------------------------------------------------------------ loglikelihood
@pytest.mark.parametrize(
    "model_args",
    [{"method": "full"}, {"method": "snapkv", "budget": 1.0}, {"method": "h2o", "budget": 10_000}],
    ids=["full", "snapkv-whole-prompt", "h2o-budget-over-everything"],
)
def test_no_eviction_equals_lm_eval_hf(model_dir, hf_lm, model_args):
    ours = KVSieveLM(pretrained=str(model_dir), **model_args).loglikelihood(requests("loglikelihood", LL_ARGS))
    theirs = hf_lm.loglikelihood(requests("loglikelihood", LL_ARGS))
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs, strict=True):
        assert lp == pytest.approx(ref_lp, abs=ATOL)
        assert greedy == ref_greedy


def direct_loglikelihood(model, method, context: list[int], continuation: list[int]) -> float:
    """kvsieve's API by hand: compress the context alone, then feed the continuation as one chunk after it."""
    cache = SieveCache(model, method.for_prompt(len(context)))
    logits = Driver(model, cache).prompt(context)
    with torch.inference_mode():
        if len(continuation) > 1:
            with cache.forward_as(Phase.DECODE):  # one chunk over the compressed context
                rest = model(input_ids=torch.tensor([continuation[:-1]]), **cache_kwargs(model, cache)).logits[0]
            logits = torch.cat([logits, rest])
        logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp[torch.arange(len(continuation)), continuation].sum())


def test_compressed_context_scores_like_kvsieve_api_and_differs_from_full(model_dir, hf_lm):
    lm = KVSieveLM(pretrained=str(model_dir), method="snapkv", budget=8, window_size=4)
    context, continuation = lm._encode_pair(text(30), " " + text(4, 3))
    ours = lm.loglikelihood(requests("loglikelihood", [(text(30), " " + text(4, 3))]))[0][0]
    expected = direct_loglikelihood(lm.model, kvsieve.method("snapkv", budget=8, window_size=4), context, continuation)
    full = hf_lm.loglikelihood(requests("loglikelihood", [(text(30), " " + text(4, 3))]))[0][0]
    assert ours == pytest.approx(expected, abs=ATOL)
    assert abs(ours - full) > 1e-2  # 8 of 31 entries kept: the score must move


def test_shared_context_equals_each_request_alone(model_dir):
    # H2O updates its cache at every fed token: each continuation must start from an untouched copy
    lm = KVSieveLM(pretrained=str(model_dir), method="h2o", budget=6)
    together = lm.loglikelihood(requests("loglikelihood", LL_ARGS[:3]))
    alone = [lm.loglikelihood(requests("loglikelihood", [a]))[0] for a in LL_ARGS[:3]]
    assert together == alone


# ----------------------------------------------------------------------------------------- generate_until
def test_generate_until_stops_at_until_and_follows_kvsieve_generate(model_dir):
    lm = KVSieveLM(pretrained=str(model_dir), method="snapkv", budget=8, window_size=4)
    context = text(30)
    ids = lm.tok_encode(context)
    reference = kvsieve.generate(lm.model, lm.tokenizer, ids, method=lm.kv_method, max_new_tokens=12)
    words = reference.text.split()
    assert len(words) >= 4 and len(set(words[:3])) == 3, f"precondition: a varied continuation, got {words}"
    stop = " " + words[2]
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = lm.generate_until(
            requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 12, "do_sample": False})])
        )
    finally:
        hook.remove()
    assert out == [reference.text.split(stop)[0]] == [" ".join(words[:2])]
    assert len(calls) == 3  # the prefill and two decode steps: stopped at the stop word, not after 12 tokens
    no_stop = lm.generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 12})]))
    assert no_stop == [reference.text]


def test_unsupported_generation_kwargs_are_refused(model_dir):
    lm = KVSieveLM(pretrained=str(model_dir))
    with pytest.raises(KVSieveLMError, match="num_beams") as error:
        lm.generate_until(requests("generate_until", [(text(5), {"until": ["."], "num_beams": 4})]))
    assert "\n" not in str(error.value)


# -------------------------------------------------------------------------------------- loglikelihood_rolling
def direct_rolling(model, method, tokens: list[int], bos: int) -> float:
    """One window (the document fits max_length): a one-token prompt, then every token fed as a decode step."""
    cache = SieveCache(model, method)
    logits = Driver(model, cache).prompt([bos])
    total = 0.0
    with torch.inference_mode():
        for token in tokens:
            total += float(torch.log_softmax(logits[0].float(), dim=-1)[token])
            logits = model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache)).logits[:, -1]
    return total


def test_rolling_keeps_the_method_active_and_matches_hf_with_full(model_dir, hf_lm):
    doc = [(text(40, 1),)]
    lm = KVSieveLM(pretrained=str(model_dir), method="streamingllm", budget=12, n_sink=2)
    ours = lm.loglikelihood_rolling(requests("loglikelihood_rolling", doc))[0]
    tokens = lm.tok_encode(doc[0][0])
    expected = direct_rolling(lm.model, kvsieve.method("streamingllm", budget=12, n_sink=2), tokens, lm.prefix_token_id)
    assert ours == pytest.approx(expected, abs=ATOL)
    full = hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", doc))[0]
    assert abs(ours - full) > 1e-2
    # a fraction of the window's tokens (prefix + 41 tokens), since a rolling window's prompt is one token
    fraction = KVSieveLM(pretrained=str(model_dir), method="streamingllm", budget=12 / 42, n_sink=2)
    assert fraction.loglikelihood_rolling(requests("loglikelihood_rolling", doc))[0] == pytest.approx(ours, abs=1e-6)
    # several windows (a document longer than max_length) with the full cache: hf's numbers
    long_doc = [(text(150, 2),)]
    ours_full = KVSieveLM(pretrained=str(model_dir)).loglikelihood_rolling(requests("loglikelihood_rolling", long_doc))
    assert ours_full[0] == pytest.approx(
        hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", long_doc))[0], abs=ATOL
    )


def test_rolling_refused_for_one_shot_methods(model_dir):
    lm = KVSieveLM(pretrained=str(model_dir), method="snapkv", budget=8)
    with pytest.raises(KVSieveLMError) as error:
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text(10),)]))
    message = str(error.value)
    assert "\n" not in message and "'snapkv'" in message
    assert all(name in message for name in ("full", "streamingllm", "h2o", "refreshkv", "infllm", "actqkv"))


# ----------------------------------------------------------------------------------------------- model_args
@pytest.mark.parametrize(
    ("model_args", "named"),
    [
        ({"method": "snapk"}, "unknown method 'snapk'"),
        ({"method": "snapkv", "budget": 2.0}, "budget"),
        ({"method": "snapkv", "budget": "lots"}, "budget"),
        ({"method": "snapkv", "windowsize": 4}, "'windowsize' (did you mean 'window_size'?)"),
        ({"method": "snapkv", "kernel_size": "4"}, "kernel_size"),  # a string read as YAML, like --param
        ({"chunk_size": 0}, "chunk_size"),
        ({"dtype": "float8"}, "dtype"),
    ],
)
def test_bad_model_args_give_one_line_naming_the_parameter(model_dir, model_args, named):
    with pytest.raises(KVSieveLMError) as error:
        KVSieveLM(pretrained=str(model_dir), **model_args)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(KVSieveLMError, match="no such file or directory") as error:
        KVSieveLM(pretrained=str(tmp_path / "nowhere"))
    assert "\n" not in str(error.value)


def test_command_line_prints_kvsieve_errors_on_one_line(model_dir, monkeypatch, capsys):
    import lm_eval.__main__

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: KVSieveLM(pretrained=str(model_dir), budget=0))
    assert main(["--model", "kvsieve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvsieve lm-eval: error: model_args:") and "\n" not in err and "budget" in err


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local tasks (multiple choice, generation, rolling perplexity) over JSONL files: nothing from a hub."""
    root = tmp_path_factory.mktemp("tasks")
    docs = [{"context": text(12, i), "choices": [text(2, i + 1), text(3, i + 2)], "label": i % 2} for i in range(3)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(root / "docs.jsonl")}, "cache_dir": str(root / "hf_cache")},
        "test_split": "test",
    }
    tasks = {
        "kvsieve_mc": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}],
        },
        "kvsieve_gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{choices[0]}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        "kvsieve_rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{context}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    for name, spec in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **spec}))
    return root


def test_simple_evaluate_runs_every_request_type(model_dir, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={model_dir},method=h2o,budget=6,recent_ratio=0.5"
    results = lm_eval.simple_evaluate(
        model="kvsieve",
        model_args=model_args,
        tasks=["kvsieve_mc", "kvsieve_gen", "kvsieve_rolling"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert set(results["results"]) == {"kvsieve_mc", "kvsieve_gen", "kvsieve_rolling"}
    assert "acc,none" in results["results"]["kvsieve_mc"]
    assert "word_perplexity,none" in results["results"]["kvsieve_rolling"]
    assert results["config"]["kvsieve_method"].startswith("h2o(budget=6")
    # what lm-eval scored is what the kvsieve model answers for the same requests
    lm = KVSieveLM(pretrained=str(model_dir), method="h2o", budget=6, recent_ratio=0.5)
    samples = results["samples"]["kvsieve_mc"]
    assert len(samples) == 3
    for sample in samples:
        args = [tuple(a) for a in sample["arguments"]]
        expected = lm.loglikelihood(requests("loglikelihood", args))
        assert [tuple(r[0]) for r in sample["resps"]] == [(pytest.approx(lp, abs=1e-6), g) for lp, g in expected]


@pytest.mark.slow  # lm-eval's command line indexes its ~15k built-in tasks first (about 10 s)
def test_command_line_end_to_end(model_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--model", "kvsieve", "--model_args", f"pretrained={model_dir},method=streamingllm,budget=8"]
    argv += ["--tasks", "kvsieve_mc,kvsieve_rolling", "--include_path", str(task_dir), "--device", "cpu"]
    argv += ["--output_path", str(out)]
    assert main(argv) == 0
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"]
    assert {"kvsieve_mc", "kvsieve_rolling"} <= set(results)
