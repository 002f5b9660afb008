"""`SieveCache`: a ``transformers.Cache`` whose layers store only what their method keeps.

One `SieveLayer` per attention layer. Each owns a `LayerPolicy` (the method's per-layer state) and:

* reports the **logical** length (tokens seen) from ``get_seq_length()`` -- the model derives every new token's
  RoPE position from it -- and ``(stored + q, seen - stored)`` from ``get_mask_sizes()``, so that all stored
  entries count as past;
* tags the keys it returns so that kvsieve's attention function finds it (see `kvsieve.attention`);
* measures what it stores and attends, for the statistics.

Gemma-3's sliding-window layers keep transformers' own ``DynamicSlidingWindowLayer`` and behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvsieve.attention import LAYER_TAG, use_sieve_attention
from kvsieve.methods.base import AttentionCall, LayerInfo, Method, Phase, PromptLayout

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one kvsieve has been validated on."""


@dataclass
class LayerMeter:
    """What one layer measured (the layer itself only stores and dispatches): entries attended, the stored size
    and bytes around compression, and optionally every call's attended positions (``trace``)."""

    trace: list[torch.Tensor] | None = None  # per attention call: the logical positions attended, [B, H_kv, S]
    attended_total: int = 0  # sum over attention calls of the entries attended per KV head
    attend_calls: int = 0
    stored_after_prefill: int | None = None
    bytes_after_prefill: int | None = None
    bytes_before_compress: int | None = None

    def record(self, positions: torch.Tensor) -> None:
        self.attended_total += positions.shape[-1]
        self.attend_calls += 1
        if self.trace is not None:
            self.trace.append(positions.detach().clone())

    def mark(self) -> tuple[int, int]:
        """A point to measure from (`attended_since`)."""
        return self.attended_total, self.attend_calls

    def attended_since(self, mark: tuple[int, int]) -> float | None:
        """Mean entries per KV head attended by the calls made since ``mark`` (None: no call)."""
        calls = self.attend_calls - mark[1]
        return (self.attended_total - mark[0]) / calls if calls else None

    def take_counts(self, other: LayerMeter) -> None:
        """Adopt ``other``'s counts and trace (a shared prefill: the full cache's attention is this layer's)."""
        self.attended_total, self.attend_calls = other.attended_total, other.attend_calls
        if self.trace is not None and other.trace is not None:
            self.trace = [t.clone() for t in other.trace]


class SieveLayer(CacheLayerMixin):
    """A cache layer that delegates storage and attention to its method's `LayerPolicy`; its `LayerMeter` measures."""

    is_compileable = False
    is_sliding = False

    def __init__(self, policy, trace: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.meter = LayerMeter(trace=[] if trace else None)
        # Set by the owning SieveCache (no reference back to it: a cycle would keep every dropped cache's tensors
        # alive until Python's cyclic collector happens to run).
        self.next_phase: Phase | None = None  # the phase of the forward under way (None: automatic)
        self.layout = PromptLayout()
        self.seen = 0  # logical tokens seen (prompt + generated), whatever is stored
        self.token_bytes = 0  # K + V bytes of one token in a plain cache (all batch rows and KV heads)
        self._phase = Phase.DECODE
        self._first_position = 0

    # ------------------------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows = key_states.shape[0] * key_states.shape[1]  # batch x KV heads
        k_bytes = key_states.shape[-1] * key_states.element_size()
        self.token_bytes = rows * (k_bytes + value_states.shape[-1] * value_states.element_size())
        self.is_initialized = True

    def uncompressed_bytes(self) -> int:
        """Bytes a plain cache would hold for the tokens seen: the reference every method's memory is compared
        with, including methods whose device cache never held the whole prompt (InfLLM's block memory)."""
        return self.seen * self.token_bytes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.next_phase is not None:
            self._phase = self.next_phase
        elif self.seen == 0:
            self._phase = Phase.PREFILL_LAST
        elif q > 1:  # model.generate with a cache that already holds a prompt: its tail would be read as new tokens
            raise RuntimeError(
                f"this SieveCache already holds a prompt ({self.seen} tokens) and a {q}-token input arrived: "
                "a cache serves one generation; create a new SieveCache for a new prompt"
            )
        else:
            self._phase = Phase.DECODE
        self._first_position = self.seen
        keys, values = self.policy.update(key_states, value_states, self.seen, self._phase)
        self.seen += q
        keys = keys[:]  # a fresh tensor object, so the tag never sticks to a buffer that outlives this call
        setattr(keys, LAYER_TAG, self)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.policy.stored_length()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a SieveCache cannot be reset; create a new one for a new prompt")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted generation is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.policy.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.policy.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvsieve caches do not support num_return_sequences > 1 or beam search yet")

    # back-compat views: some transformers utilities read ``layer.keys`` / ``layer.values``
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.policy.store.is_empty else self.policy.store.keys

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.policy.store.is_empty else self.policy.store.values

    @values.setter
    def values(self, value) -> None:
        pass

    # --------------------------------------------------------------------------------------- attention
    def follow(self, phase: Phase, first_position: int, seen: int) -> None:
        """Take another layer's place in the forward under way (a shared prefill: this layer's policy observes the
        chunk the full cache stores)."""
        self._phase, self._first_position, self.seen = phase, first_position, seen

    def call(self, module, query, keys, values, scaling, kwargs: dict[str, Any]) -> AttentionCall:
        """The `AttentionCall` of the forward under way, over ``keys``/``values``."""
        return AttentionCall(
            module=module,
            query=query,
            keys=keys,
            values=values,
            scaling=scaling,
            phase=self._phase,
            first_position=self._first_position,
            seen=self.seen,
            kwargs=kwargs,
            record=self.meter.record,
            layout=self.layout,
        )

    def attend(self, module, query, keys, values, scaling, kwargs: dict[str, Any]) -> torch.Tensor:
        call = self.call(module, query, keys, values, scaling, kwargs)
        if self._phase is not Phase.DECODE:
            self.policy.observe(call)
        out = self.policy.attend(call)
        if self._phase is Phase.PREFILL_LAST:
            self.complete_prompt(call)
        return out

    def complete_prompt(self, call: AttentionCall) -> None:
        """The prompt is complete: the policy compresses, the meter notes the sizes before and after."""
        self.meter.bytes_before_compress = self.uncompressed_bytes()
        self.policy.compress(call)
        self.meter.stored_after_prefill = self.policy.stored_length()
        self.meter.bytes_after_prefill = self.policy.kv_bytes()


class SieveCache(Cache):
    """A ``transformers.Cache`` for one generation with a kvsieve method.

    ``SieveCache(model, kvsieve.method("snapkv", budget=256))`` switches ``model`` to kvsieve's attention function
    (identical to sdpa for any other cache) and can be passed as ``model.generate(past_key_values=cache)``: the
    first multi-token forward is taken as the whole prompt and compressed layer by layer right after it.
    ``kvsieve.generate`` drives the phases explicitly instead (chunked prefill, a question fed after compression).

    ``method``: a `Method`, a registered name (``"snapkv"``: its default parameters) or None (the full cache).
    ``trace=True`` records, per layer and attention call, the logical positions attended (``[B, H_kv, S]``), for
    tests and analysis.
    """

    def __init__(self, model_or_config, method: Method | str | None = None, *, reserve: int = 64, trace: bool = False):
        config = getattr(model_or_config, "config", model_or_config)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_supported(text_config)
        self.method = as_method(method)
        self.trace = trace
        self.shared: dict[str, Any] = {}  # per-cache state that a method shares across its layers (LayerInfo.shared)
        n_layers = text_config.num_hidden_layers
        n_heads = text_config.num_attention_heads
        n_kv = getattr(text_config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
        layers: list[CacheLayerMixin] = []
        for idx, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window))
            elif kind == "full_attention":
                info = LayerInfo(idx, n_layers, n_heads, n_kv, head_dim, text_config, shared=self.shared)
                layers.append(SieveLayer(self.method.make_policy(info, reserve), trace))
            else:
                raise UnsupportedModelError(f"layer type {kind!r} (layer {idx}) is not supported by kvsieve")
        super().__init__(layers=layers)
        if isinstance(model_or_config, torch.nn.Module):
            use_sieve_attention(model_or_config)

    @contextmanager
    def forward_as(self, phase: Phase) -> Iterator[None]:
        """Every layer takes the next forward as ``phase`` (`kvsieve.driver.Driver` feeds chunked prompts and
        question chunks this way); outside the block the phase is automatic again (``model.generate``: the first
        forward is the whole prompt)."""
        layers = self.sieve_layers
        for layer in layers:
            layer.next_phase = phase
        try:
            yield
        finally:
            for layer in layers:
                layer.next_phase = None

    @property
    def layout(self) -> PromptLayout:
        """The prompt's parts (the question's span), read by every policy through `AttentionCall.layout`."""
        layers = self.sieve_layers
        return layers[0].layout if layers else PromptLayout()

    @layout.setter
    def layout(self, layout: PromptLayout) -> None:
        if not isinstance(layout, PromptLayout):
            raise TypeError(f"layout must be a kvsieve PromptLayout, got {type(layout).__name__}")
        for layer in self.sieve_layers:
            layer.layout = layout

    @property
    def question_span(self) -> tuple[int, int] | None:
        """The layout's question ``[start, end)`` (None: none)."""
        return self.layout.question

    # ``model.generate`` marks the cache it is handed at the start of every call (transformers 5.x): the one moment
    # a spent cache can be told from a cache being continued, so a second prompt fails here instead of being read
    # as the continuation of the first (a one-token difference would otherwise pass silently).
    @property
    def _is_user_defined(self) -> bool:
        return self.__dict__.get("_user_defined", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        if value and self.tokens_seen():
            raise RuntimeError(
                f"this SieveCache already holds a prompt ({self.tokens_seen()} tokens): a cache serves one "
                "generation; create a new SieveCache for each model.generate call"
            )
        self.__dict__["_user_defined"] = value

    def tokens_seen(self) -> int:
        """Logical tokens the cache has read (prompt, question and generated), whatever it stores."""
        layers = self.sieve_layers
        return layers[0].seen if layers else 0

    @property
    def sieve_layers(self) -> list[SieveLayer]:
        return [layer for layer in self.layers if isinstance(layer, SieveLayer)]

    # ------------------------------------------------------------------------------------- statistics
    def stored_tokens(self) -> list[int]:
        """Entries per KV head each layer stores now (sliding layers: their window)."""
        return [stored_entries(layer) for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of K/V entries held now by all layers, measured from the tensors."""
        return sum(layer_kv_bytes(layer) for layer in self.layers)


def as_method(spec: Method | str | None) -> Method:
    """A `Method` from a method spec: a `Method`, a registered name (its default parameters) or None (the full
    cache)."""
    from kvsieve.methods import method as make_method

    if spec is None:
        return make_method("full")
    if isinstance(spec, str):
        return make_method(spec)
    if not isinstance(spec, Method):
        raise TypeError(
            f"method must be a kvsieve Method (kvsieve.method(name, ...)), a method name or None (the full cache), "
            f"got {type(spec).__name__}"
        )
    return spec


def stored_entries(layer: CacheLayerMixin) -> int:
    if isinstance(layer, SieveLayer):
        return layer.policy.stored_length()
    return 0 if layer.keys is None else layer.keys.shape[-2]


def layer_kv_bytes(layer: CacheLayerMixin) -> int:
    if isinstance(layer, SieveLayer):
        return layer.policy.kv_bytes()
    if layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by kvsieve; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
