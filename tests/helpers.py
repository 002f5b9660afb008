"""Test helpers: tiny random-init models of each supported architecture, a phase-explicit greedy loop that
returns logits, and the masked full-cache reference that eviction methods must reproduce."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
from pathlib import Path

import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvsieve.cache import SieveCache
from kvsieve.driver import cache_kwargs
from kvsieve.methods.base import Phase

VOCAB = 256
# initializer_range 0.1 (not 0.02): peaked attention and logits of O(1), so masking or position errors show.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=1024),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_hidden_layers=3, max_position_embeddings=1024),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_hidden_layers=3, head_dim=16, max_position_embeddings=1024),
    "mistral": lambda: MistralConfig(**_COMMON, num_hidden_layers=3, sliding_window=None, max_position_embeddings=1024),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024,
    ),
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model


def tiny_llama_for(tokenizer, window: int, seed: int = 0):
    """A tiny random-init Llama over ``tokenizer``'s whole vocabulary (real text prompts), trained window ``window``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**_COMMON, "vocab_size": len(tokenizer)},
        num_hidden_layers=2,
        max_position_embeddings=window,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def random_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@torch.inference_mode()
def greedy_with_logits(
    model, cache, context: list[int], n_new: int, question: list[int] | None = None, chunk_size: int | None = None
):
    """Prefill (chunked, optional question chunk fed after compression) then greedy decode; returns the tokens and
    the logits ``[n_new, V]`` that chose them. ``cache`` is a SieveCache (phases set explicitly) or a DynamicCache."""
    pieces = [context[i : i + chunk_size] for i in range(0, len(context), chunk_size)] if chunk_size else [context]
    phases = [Phase.PREFILL] * (len(pieces) - 1) + [Phase.PREFILL_LAST]
    if question:
        pieces.append(question)
        phases.append(Phase.DECODE)
    logits = None
    for piece, phase in zip(pieces, phases):
        ids = torch.tensor([piece])
        with cache.forward_as(phase) if isinstance(cache, SieveCache) else contextlib.nullcontext():
            logits = model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1].float()
    tokens, all_logits = [], []
    for step in range(n_new):
        all_logits.append(logits[0])
        token = int(logits.argmax(-1))
        tokens.append(token)
        if step + 1 < n_new:
            logits = model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache)).logits[:, -1].float()
    return tokens, torch.stack(all_logits)


_reference_names = itertools.count()


@torch.inference_mode()
def masked_reference(model, traces: dict[int, list[torch.Tensor]], context, tokens, question=None, chunk_size=None):
    """Replay the same forwards with the FULL cache, masking per layer, head and call exactly the entries the
    compressed run did not attend (``traces``: layer -> per-call attended positions ``[B, H_kv, S]``).

    Decoding is teacher-forced with the compressed run's ``tokens``; returns the logits ``[n, V]``."""
    counters = dict.fromkeys(traces, 0)

    def masked_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer not in traces:  # not a kvsieve layer (Gemma-3 sliding window): plain sdpa
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        attended = traces[layer][counters[layer]].long()
        counters[layer] += 1
        b, n_kv, total = key.shape[0], key.shape[1], key.shape[2]
        q = query.shape[2]
        allowed = torch.zeros(b, n_kv, total, dtype=torch.bool).scatter_(2, attended, True)
        causal = torch.arange(total)[None, :] <= (torch.arange(q) + total - q)[:, None]
        mask = allowed[:, :, None, :] & causal[None, None]
        g = module.num_key_value_groups
        mask = mask.repeat_interleave(g, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=mask, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None

    logits = teacher_forced_replay(model, masked_attention, context, tokens, question, chunk_size)
    for layer, count in counters.items():
        assert count == len(traces[layer]), f"layer {layer}: replayed {count} calls, traced {len(traces[layer])}"
    return logits


@torch.inference_mode()
def teacher_forced_replay(model, attention, context, tokens, question=None, chunk_size=None) -> torch.Tensor:
    """Run ``context`` (in chunks), the optional ``question`` chunk and the ``tokens`` teacher-forced on a full
    `DynamicCache` with ``attention`` as the model's attention function; returns the logits ``[n, V]`` that chose
    each token (the reference replays of the tests)."""
    name = f"kvsieve_test_replay_{next(_reference_names)}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        cache = DynamicCache(config=model.config)
        pieces = [context[i : i + chunk_size] for i in range(0, len(context), chunk_size)] if chunk_size else [context]
        if question:
            pieces.append(question)
        logits = None
        for piece in pieces:
            logits = model(input_ids=torch.tensor([piece]), logits_to_keep=1, **cache_kwargs(model, cache)).logits
        all_logits = [logits[0, -1].float()]
        for token in tokens[:-1]:
            out = model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache))
            all_logits.append(out.logits[0, -1].float())
    finally:
        model.set_attn_implementation(previous)
    return torch.stack(all_logits)


def traces_of(cache: SieveCache) -> dict[int, list[torch.Tensor]]:
    traced = {i: getattr(layer, "meter", None) for i, layer in enumerate(cache.layers)}
    return {i: meter.trace for i, meter in traced.items() if meter is not None and meter.trace is not None}


class IdTokenizer:
    """A stand-in tokenizer for tiny models: prompts are space-separated token ids; decoding joins the ids."""

    chat_template = None

    def __init__(self, eos: int | None = None):
        self.eos_token_id = eos

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def spy_observed_calls(cache: SieveCache) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Wrap every layer policy's ``observe``: the dict fills with each layer's last ``(query, keys, scaling)``."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for i, layer in enumerate(cache.sieve_layers):
        original = layer.policy.observe

        def spy(call, i=i, original=original):
            seen[i] = (call.query.clone(), call.keys.clone(), call.scaling)
            original(call)

        layer.policy.observe = spy
    return seen


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module
