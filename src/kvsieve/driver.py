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
    resolved for it: `Method.for_prompt`); with a list of lengths, for a batch of prompts, one row each. A cache that
    has already read tokens is refused by `prefill`: a cache serves one prompt (one per row).

    Batches (the ``*_rows`` methods; the one-prompt methods are their one-row case): every forward is left-padded to
    its longest row, the attention mask marks the padding and each row's positions count only its own tokens, so
    that every row's method state reads exactly its own prompt (`kvsieve.rows`). A chunked prompt is fed in each
    row's own chunks, aligned on the last one (every row completes its prompt in the same forward); a row that has
    stopped is fed nothing (``None``).
    """

    def __init__(self, model, cache: SieveCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.get_input_embeddings().weight.device
        # every GPU the model's layers are on (a model split with device_map="auto"): timings wait for all of them
        self.cuda_devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self.timings = Timings()
        # the attention mask over the padded columns fed so far [B, columns]; None while no row was ever padded
        self.mask: torch.Tensor | None = None
        # transformers' own sliding-window layers (Gemma 3) keep padded columns: padding after a row's first tokens
        # would push that row's real tokens out of their window
        self.has_plain_layers = any(not isinstance(layer, SieveLayer) for layer in cache.layers)

    @classmethod
    def new(
        cls,
        model,
        method: Method | str | None,
        prompt_tokens: int | Sequence[int],
        *,
        reserve: int = 64,
        trace: bool = False,
    ) -> Driver:
        """A driver over a fresh cache of ``method`` resolved for a ``prompt_tokens``-token prompt (a list: one
        batch row per prompt length, each row's method resolved for its own); ``reserve``: spare entries per store
        for what follows the prompt (question, generated tokens)."""
        base = as_method(method)
        if isinstance(prompt_tokens, int):
            return cls(model, SieveCache(model, base.for_prompt(prompt_tokens), reserve=reserve, trace=trace))
        rows = [base.for_prompt(n) for n in prompt_tokens]
        return cls(model, SieveCache(model, rows[0], reserve=reserve, trace=trace, row_methods=rows))

    @property
    def method(self) -> Method:
        return self.cache.method

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def copy(self) -> Driver:
        """A driver over an independent copy of the cache (policies, stores, meters) with the timings so far:
        one compressed context, several questions or continuations."""
        twin = Driver(self.model, copy.deepcopy(self.cache))
        twin.timings = dataclasses.replace(self.timings)
        twin.mask = None if self.mask is None else self.mask.clone()
        return twin

    # ------------------------------------------------------------------------------------------- forwards
    def _sync(self) -> None:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)

    def forward(self, ids: Sequence[int], phase: Phase) -> tuple[torch.Tensor, float]:
        """One forward of ``ids`` as ``phase``: the last position's logits ``[1, V]`` and the seconds it took."""
        return self.forward_rows([ids], phase)

    def forward_rows(self, rows: Sequence[Sequence[int] | None], phase: Phase) -> tuple[torch.Tensor, float]:
        """One forward of each batch row's tokens (``None`` or empty: none) as ``phase``, left-padded to the longest:
        the last column's logits ``[B, V]`` (a row fed nothing: meaningless) and the seconds it took."""
        batch = self.batch_size
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} rows of tokens given to a cache of {batch} batch rows")
        rows = [list(r) if r is not None else [] for r in rows]
        width = max(map(len, rows))
        if width == 0:
            raise ValueError("every batch row is empty: nothing to feed")
        padded = any(len(r) < width for r in rows)
        kwargs: dict[str, Any] = {}
        if padded or self.mask is not None:
            kwargs = self._padding(rows, width)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        self._sync()
        start = time.perf_counter()
        # no autograd: nothing here is trained, and a graph would hold every layer's activations
        with torch.no_grad(), self.cache.forward_as(phase):
            out = self.model(input_ids=ids, logits_to_keep=1, **kwargs, **cache_kwargs(self.model, self.cache))
        self._sync()
        return out.logits[:, -1], time.perf_counter() - start

    def _padding(self, rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
        """The forward's ``attention_mask`` (every padded column so far) and each row's ``position_ids`` (its own
        token count), for a left-padded chunk."""
        seen = [self.cache.row_tokens_seen(row) for row in range(len(rows))]
        if self.has_plain_layers:
            inside = [row for row, r in enumerate(rows) if 0 < len(r) < width and seen[row] > 0]
            if inside:
                raise ValueError(
                    f"batch row {inside[0]} would be padded after its first tokens, and this model has sliding-window "
                    "layers that keep padding in their window (a question or prompt chunk shorter than another "
                    "row's): give every row a question of the same length and no chunk_size, or run them one at a time"
                )
        if self.mask is None:
            self.mask = torch.ones(len(rows), self.cache.tokens_seen(), dtype=torch.long, device=self.device)
        chunk = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        positions = torch.zeros_like(chunk)
        for row, r in enumerate(rows):
            if r:
                chunk[row, width - len(r) :] = 1
                positions[row, width - len(r) :] = torch.arange(seen[row], seen[row] + len(r))
        self.mask = torch.cat([self.mask, chunk], dim=1)
        return {"attention_mask": self.mask, "position_ids": positions}

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
        return self.prefill_rows([ids], chunk_size, complete=complete, layouts=None if layout is None else [layout])

    def prefill_rows(
        self,
        prompts: Sequence[Sequence[int]],
        chunk_size: int | None = None,
        *,
        complete: bool = True,
        layouts: Sequence[PromptLayout] | None = None,
    ) -> torch.Tensor:
        """`prefill` for a batch: one prompt per row, each cut into its own chunks; the rows' last chunks go in the
        same (last) forward. Returns its logits ``[B, V]``."""
        if not prompts or any(not ids for ids in prompts):
            raise ValueError("the prompt is empty")
        seen = self.cache.tokens_seen()
        if seen:
            raise RuntimeError(
                f"this SieveCache already holds a prompt ({seen} tokens): a cache serves one prompt; create a new one"
            )
        if layouts is not None:
            self.cache.set_layouts(layouts)
        pieces = [chunks(ids, chunk_size) for ids in prompts]
        n_forwards = max(map(len, pieces))
        logits = None
        for i in range(n_forwards):
            last = complete and i == n_forwards - 1
            rows = [p[i - (n_forwards - len(p))] if i >= n_forwards - len(p) else None for p in pieces]
            logits, seconds = self.forward_rows(rows, Phase.PREFILL_LAST if last else Phase.PREFILL)
            self.timings.prefill_s += seconds
        return logits

    def question(self, ids: Sequence[int], *, completes_prompt: bool = False) -> torch.Tensor:
        """Feed a question as its own chunk after what the cache has read: over the compressed context
        (``DECODE``), or completing the prompt (``completes_prompt``: the method compresses after it). The cache's
        layout names the question's span first."""
        return self.question_rows([ids], completes_prompt=completes_prompt)

    def question_rows(self, questions: Sequence[Sequence[int]], *, completes_prompt: bool = False) -> torch.Tensor:
        """`question` for a batch: one question per row, each row's layout naming its span; logits ``[B, V]``."""
        if any(not ids for ids in questions):
            raise ValueError("the question is empty")
        self.cache.set_layouts(
            [
                PromptLayout.question_after(self.cache.row_tokens_seen(row), len(ids))
                for row, ids in enumerate(questions)
            ]
        )
        logits, seconds = self.forward_rows(questions, Phase.PREFILL_LAST if completes_prompt else Phase.DECODE)
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
        return self.prompt_rows([context], [question], chunk_size=chunk_size, question_in_prompt=question_in_prompt)

    def prompt_rows(
        self,
        contexts: Sequence[Sequence[int]],
        questions: Sequence[Sequence[int]] | None = None,
        *,
        chunk_size: int | None = None,
        question_in_prompt: bool = False,
    ) -> torch.Tensor:
        """`prompt` for a batch: one context per row and either a question for every row or none; logits ``[B, V]``."""
        contexts = [list(c) for c in contexts]
        questions = [list(q) for q in questions] if questions is not None else [[] for _ in contexts]
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions for {len(contexts)} prompts: give one per prompt")
        asked = [bool(q) for q in questions]
        if any(asked) and not all(asked):
            raise ValueError("either every prompt of a batch has a question or none has")
        if any(asked) and question_in_prompt:
            layouts = [PromptLayout.question_after(len(c), len(q)) for c, q in zip(contexts, questions)]
            return self.prefill_rows([c + q for c, q in zip(contexts, questions)], chunk_size, layouts=layouts)
        late = any(asked) and self.method.compress_after_question
        logits = self.prefill_rows(contexts, chunk_size, complete=not late)
        if any(asked):
            logits = self.question_rows(questions, completes_prompt=late)
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Feed one token (generated or teacher-forced); returns its logits ``[1, V]``."""
        return self.step_rows([token])

    def step_rows(self, tokens: Sequence[int | None]) -> torch.Tensor:
        """`step` for a batch: one token per row (``None``: a row that has stopped, fed nothing); logits ``[B, V]``."""
        logits, seconds = self.forward_rows([None if t is None else [t] for t in tokens], Phase.DECODE)
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
