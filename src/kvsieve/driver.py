"""`Driver`: the one place that feeds a `SieveCache` through a model.

Every path that runs a kvsieve cache -- `kvsieve.generate`, `kvsieve.compress`, the evaluation harness, shared
prefill, benchmarks, the lm-evaluation-harness client -- feeds it through a driver, so the sequence is written once:

* `prefill` -- prompt tokens, whole or in chunks: every chunk but the last is ``PREFILL``; the last is
  ``PREFILL_LAST`` (one-shot methods compress right after each layer's attention over it) unless the prompt is
  not complete yet (``complete=False``: a question whose tokens are the method's proxies follows);
* `question` -- a question as its own chunk, after a compressed context (``DECODE``: the policies read it over
  what they kept) or completing the prompt (``PREFILL_LAST``); the cache's layout names its span either way;
* `prompt` -- the two above as a prompt with an optional question asks for (query-aware or query-agnostic);
* `step` -- one generated or teacher-forced token.

Each forward's phase is handed to the cache for that forward only (`SieveCache.forward_as`). The driver times the
forwards (device-synchronised) into `Timings`, so callers never re-time them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvsieve.cache import SieveCache, SieveLayer, as_method, layer_kv_bytes, stored_entries
from kvsieve.methods.base import Method, Phase, PromptLayout

__all__ = ["Driver", "KVSnapshot", "Timings", "cache_kwargs"]


@dataclass
class Timings:
    """Seconds the driver's forwards took (device-synchronised)."""

    prefill_s: float = 0.0  # prompt chunks, compression included
    question_s: float = 0.0  # the question chunk
    decode_s: float = 0.0  # `step` forwards
    decode_steps: int = 0

    @property
    def decode_s_per_token(self) -> float | None:
        return self.decode_s / self.decode_steps if self.decode_steps else None


@dataclass(frozen=True)
class KVSnapshot:
    """Entries per layer (``stored``), bytes held (``bytes``) and bytes a plain cache would hold for the same
    tokens in the same layers (``bytes_full``), right after compression (before a question chunk or decoding).
    For InfLLM/ActQKV ``bytes`` is what sits on the device, their host store apart."""

    stored: list[int]
    bytes: int
    bytes_full: int

    @property
    def mean_stored(self) -> float:
        return sum(self.stored) / len(self.stored)

    @classmethod
    def of(cls, cache: SieveCache, row: int = 0) -> KVSnapshot:
        """The snapshot of batch row ``row`` (its padding apart, except in sliding-window layers' windows)."""
        stored, held, full = [], 0, 0
        for layer in cache.layers:
            meter = layer.rows[row].meter if isinstance(layer, SieveLayer) else None
            if meter is not None and meter.stored_after_prefill is not None:
                stored.append(meter.stored_after_prefill)
                held += meter.bytes_after_prefill
                full += meter.bytes_before_compress
            else:  # layers that do not compress once at the prompt's end, and built-in (sliding window) layers
                stored.append(stored_entries(layer, row))
                held += layer_kv_bytes(layer, row)
                full += layer.uncompressed_bytes(row) if isinstance(layer, SieveLayer) else layer_kv_bytes(layer, row)
        return cls(stored, held, full)


def cache_kwargs(model, cache) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model``'s forward."""
    return {_cache_keyword(type(model)): cache, "use_cache": True}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """``cache`` from transformers 5.24 on, ``past_key_values`` before (5.24 still accepts it, with a warning)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def chunks(ids: Sequence[int], size: int | None) -> list[list[int]]:
    """``ids`` in pieces of ``size`` (None: one piece)."""
    if size is None or size >= len(ids):
        return [list(ids)]
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


class Driver:
    """Feeds one `SieveCache` through ``model``: `prompt` (or `prefill` and `question`), then `step` per token.

    ``Driver.new(model, method, prompt_tokens)`` builds the cache for a prompt of that many tokens (the method
    resolved for it: `Method.for_prompt`). A cache that has already read tokens is refused by `prefill`: a cache
    serves one prompt.
    """

    def __init__(self, model, cache: SieveCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.get_input_embeddings().weight.device
        # every GPU the model's layers are on (a model split with device_map="auto"): timings wait for all of them
        self.cuda_devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self.timings = Timings()

    @classmethod
    def new(
        cls, model, method: Method | str | None, prompt_tokens: int, *, reserve: int = 64, trace: bool = False
    ) -> Driver:
        """A driver over a fresh cache of ``method`` resolved for a ``prompt_tokens``-token prompt; ``reserve``:
        spare entries per store for what follows the prompt (question, generated tokens)."""
        resolved = as_method(method).for_prompt(prompt_tokens)
        return cls(model, SieveCache(model, resolved, reserve=reserve, trace=trace))

    @property
    def method(self) -> Method:
        return self.cache.method

    def copy(self) -> Driver:
        """A driver over an independent copy of the cache (policies, stores, meters) with the timings so far:
        one compressed context, several questions or continuations."""
        twin = Driver(self.model, copy.deepcopy(self.cache))
        twin.timings = dataclasses.replace(self.timings)
        return twin

    # ------------------------------------------------------------------------------------------- forwards
    def _sync(self) -> None:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)

    def forward(self, ids: Sequence[int], phase: Phase) -> tuple[torch.Tensor, float]:
        """One forward of ``ids`` as ``phase``: the last position's logits ``[1, V]`` and the seconds it took."""
        tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        self._sync()
        start = time.perf_counter()
        with self.cache.forward_as(phase):
            out = self.model(input_ids=tensor, logits_to_keep=1, **cache_kwargs(self.model, self.cache))
        self._sync()
        return out.logits[:, -1], time.perf_counter() - start

    def prefill(
        self,
        ids: Sequence[int],
        chunk_size: int | None = None,
        *,
        complete: bool = True,
        layout: PromptLayout | None = None,
    ) -> torch.Tensor:
        """Feed prompt tokens; ``complete``: they end the prompt (the last chunk compresses). ``layout``: the
        prompt's parts (query-aware use: the question's span inside it). Returns the last logits ``[1, V]``."""
        if not ids:
            raise ValueError("the prompt is empty")
        seen = self.cache.tokens_seen()
        if seen:
            raise RuntimeError(
                f"this SieveCache already holds a prompt ({seen} tokens): a cache serves one prompt; create a new one"
            )
        if layout is not None:
            self.cache.layout = layout
        pieces = chunks(ids, chunk_size)
        logits = None
        for i, piece in enumerate(pieces):
            last = complete and i == len(pieces) - 1
            logits, seconds = self.forward(piece, Phase.PREFILL_LAST if last else Phase.PREFILL)
            self.timings.prefill_s += seconds
        return logits

    def question(self, ids: Sequence[int], *, completes_prompt: bool = False) -> torch.Tensor:
        """Feed a question as its own chunk after what the cache has read: over the compressed context
        (``DECODE``), or completing the prompt (``completes_prompt``: the method compresses after it). The cache's
        layout names the question's span first."""
        if not ids:
            raise ValueError("the question is empty")
        start = self.cache.tokens_seen()
        self.cache.layout = PromptLayout.question_after(start, len(ids))
        logits, seconds = self.forward(ids, Phase.PREFILL_LAST if completes_prompt else Phase.DECODE)
        self.timings.question_s += seconds
        return logits

    def prompt(
        self,
        context: Sequence[int],
        question: Sequence[int] = (),
        *,
        chunk_size: int | None = None,
        question_in_prompt: bool = False,
    ) -> torch.Tensor:
        """Feed a prompt and its question the way the method and the use ask for; returns the last logits.

        ``question_in_prompt`` (query-aware): context and question are one prompt, compressed as a whole, the
        layout naming the question's span. Otherwise (query-agnostic) the context is compressed alone and the
        question follows as its own chunk -- except for methods whose proxies are the question
        (``compress_after_question``, NACL): they compress after the question chunk.
        """
        context, question = list(context), list(question)
        if question and question_in_prompt:
            layout = PromptLayout.question_after(len(context), len(question))
            return self.prefill(context + question, chunk_size, layout=layout)
        late = bool(question) and self.method.compress_after_question
        logits = self.prefill(context, chunk_size, complete=not late)
        if question:
            logits = self.question(question, completes_prompt=late)
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Feed one token (generated or teacher-forced); returns its logits ``[1, V]``."""
        logits, seconds = self.forward([token], Phase.DECODE)
        self.timings.decode_s += seconds
        self.timings.decode_steps += 1
        return logits

    # ---------------------------------------------------------------------------------------- measurement
    def snapshot(self, row: int = 0) -> KVSnapshot:
        """What the cache holds right after compression (`KVSnapshot`), for batch row ``row``."""
        return KVSnapshot.of(self.cache, row)

    def mark(self, row: int = 0) -> list[tuple[int, int]]:
        """A point to measure batch row ``row``'s attended entries from (`attended_since`)."""
        return [layer.rows[row].meter.mark() for layer in self.cache.sieve_layers]

    def attended_since(self, mark: list[tuple[int, int]], row: int = 0) -> float | None:
        """Mean over layers of the entries per KV head one call of batch row ``row`` since ``mark`` attended
        (measured)."""
        per_layer = [layer.rows[row].meter.attended_since(m) for layer, m in zip(self.cache.sieve_layers, mark)]
        kept = [v for v in per_layer if v is not None]
        return sum(kept) / len(kept) if kept else None
