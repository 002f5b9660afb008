"""The kvpress side of `benchmarks/kvpress_crosscheck.py`: run in kvpress's own virtualenv, never in kvsieve's.

kvpress 0.5.5 needs transformers < 5.3 while kvsieve pins 5.23-5.24, so the driver starts this file with the
kvpress venv's python and talks to it over stdin/stdout, one JSON object a line. It imports only the standard
library, torch, transformers and (inside ``main``) kvpress, and never kvsieve.

Each request names a prompt (an index into the driver's token-id file), a press and its options. The worker runs
kvpress's own query-agnostic path, ``KVPressTextGenerationPipeline._forward`` (prefill the context under the press,
then greedy decoding of the question with explicit position ids), on those token ids, and answers with:

* the greedy tokens, read from the logits of every forward of the causal LM through a forward hook (the pipeline
  itself returns only decoded text);
* optionally the original positions each (layer, KV head) kept: a hook that runs before the press's own one
  copies every layer's uncompressed prefill keys, and after ``_forward`` (which crops the answer off the cache
  again) each kept key is matched exactly against them (``match_positions``). kvpress gathers keys without
  changing them, so every kept key equals exactly one uncompressed key;
* timings: the prefill (the base model's forward over the context, with the press's hook, plus the question
  forward) and the mean decode forward; and the K/V bytes held after compression.

    /work/venvs/kvpress/bin/python benchmarks/kvpress_worker.py --model DIR --prompts ids.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch


def match_positions(original: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Sorted original positions of the kept keys, per KV head.

    ``original`` ``[H_kv, S, D]`` and ``kept`` ``[H_kv, k, D]`` (in any order). Each kept row must equal one
    original row bitwise; raises ValueError otherwise, or when two kept rows map to the same original one.
    """
    out: list[list[int]] = []
    for head in range(original.shape[0]):
        orig, sel = original[head].double(), kept[head].double()
        index = torch.cdist(sel, orig).argmin(dim=-1)  # nearest original row of every kept row
        if not torch.equal(original[head][index], kept[head]):
            raise ValueError(f"head {head}: a kept key is not bitwise equal to any uncompressed key")
        positions = sorted(index.tolist())
        if len(set(positions)) != len(positions):
            raise ValueError(f"head {head}: two kept keys match the same uncompressed key")
        out.append(positions)
    return out


class Recorder:
    """Forward hooks: greedy tokens and timings of every forward, uncompressed prefill keys per layer."""

    def __init__(self, model: torch.nn.Module, record_keys: bool) -> None:
        self.record_keys = record_keys
        self.tokens: list[int] = []
        self.top: list[list[float]] = []  # the first step's top-5 logits as [id, value] pairs
        self.base_s: list[float] = []  # base-model forwards (the context prefill)
        self.lm_s: list[float] = []  # causal-LM forwards (the question, then one per decode step)
        self.keys: dict[int, torch.Tensor] = {}
        self._t0 = 0.0
        self._t1 = 0.0
        self.handles = [
            model.model.register_forward_pre_hook(self._base_start),
            model.model.register_forward_hook(self._base_end),
            model.register_forward_pre_hook(self._lm_start),
            model.register_forward_hook(self._lm_end),
        ]
        if record_keys:  # registered before the press enters: runs before its compression hook
            for layer in model.model.layers:
                self.handles.append(layer.self_attn.register_forward_hook(self._snapshot, with_kwargs=True))

    def _base_start(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _base_end(self, module, args, output) -> None:
        self.base_s.append(time.perf_counter() - self._t0)

    def _lm_start(self, module, args) -> None:
        self._t1 = time.perf_counter()

    def _lm_end(self, module, args, output) -> None:
        logits = output.logits[0, -1]
        self.lm_s.append(time.perf_counter() - self._t1)
        self.tokens.append(int(logits.argmax()))
        if not self.top:
            values, ids = logits.float().topk(5)
            self.top = [[int(i), float(v)] for i, v in zip(ids, values)]

    def _snapshot(self, module, args, kwargs, output) -> None:
        layer = module.layer_idx
        if layer not in self.keys:  # the first forward of this layer is the context prefill
            self.keys[layer] = kwargs["past_key_values"].layers[layer].keys[0].clone()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_press(kind: str, params: dict[str, Any]):
    """A kvpress press by short name (None for the full cache)."""
    import kvpress

    if kind == "full":
        return None
    if kind == "snapkv":
        return kvpress.SnapKVPress(**params)
    if kind == "streamingllm":
        return kvpress.StreamingLLMPress(**params)
    raise ValueError(f"unknown press {kind!r}")


@torch.inference_mode()
def run_request(pipe, prompts: list[dict[str, Any]], request: dict[str, Any]) -> dict[str, Any]:
    """Run one request (see the module docstring) and return its JSON-able result."""
    from transformers import DynamicCache

    prompt = prompts[request["prompt"]]
    model = pipe.model
    context = torch.tensor([prompt["context_ids"]], dtype=torch.long)
    question = torch.tensor([prompt["question_ids"]], dtype=torch.long)
    press = make_press(request["press"], request.get("params", {}))
    cache = DynamicCache()
    recorder = Recorder(model, record_keys=bool(request.get("record", True)))
    try:
        text = pipe._forward(
            {"context_ids": context, "questions_ids": [question]},
            max_new_tokens=request["max_new_tokens"],
            press=press,
            cache=cache,
        )[0]
    finally:
        recorder.remove()
    kept_layers = [cache.layers[i] for i in range(len(cache.layers))]
    kv_bytes = sum(t.numel() * t.element_size() for layer in kept_layers for t in (layer.keys, layer.values))
    n_kept = [layer.keys.shape[-2] for layer in kept_layers]
    kept = None
    if recorder.record_keys:
        kept = [match_positions(recorder.keys[i], layer.keys[0]) for i, layer in enumerate(kept_layers)]
    decode = recorder.lm_s[1:]
    return {
        "id": request.get("id"),
        "tokens": recorder.tokens,
        "text": text,
        "top5": recorder.top,
        "n_kept": n_kept,
        "kept": kept,
        "kv_bytes": kv_bytes,
        "prefill_s": recorder.base_s[0] + recorder.lm_s[0],
        "decode_s_per_token": sum(decode) / len(decode) if decode else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory (the one kvsieve converted)")
    parser.add_argument("--prompts", required=True, help="JSON file of prompts with context_ids and question_ids")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    # The protocol owns fd 1; anything else that prints (warnings, progress bars) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    torch.set_num_threads(args.threads)

    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(args.prompts) as f:
        prompts = json.load(f)["prompts"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True
    ).eval()
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    versions = {
        "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    protocol.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        try:
            result = run_request(pipe, prompts, request)
        except Exception as error:  # report to the driver rather than dying silently
            result = {"id": request.get("id"), "error": f"{type(error).__name__}: {error}"}
        protocol.write(json.dumps(result) + "\n")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
