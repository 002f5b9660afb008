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

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvsieve.attention import LAYER_TAG, use_sieve_attention
from kvsieve.methods.base import AttentionCall, LayerInfo, LayerPolicy, Method, Phase, PromptLayout
from kvsieve.rows import LayerMeter, Row, real_tokens, row_sources

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one kvsieve has been validated on."""


class SieveLayer(CacheLayerMixin):
    """A cache layer that delegates storage and attention to its method's `LayerPolicy`, one per batch row.

    A layer starts with one `Row`; the first forward of a batch of ``B`` rows adds ``B - 1`` fresh ones (each a
    batch-1 policy of the same method, made by ``make_policy(row)``). Every forward, each row's policy is fed only
    that row's real tokens (`kvsieve.rows.real_tokens`: left padding is dropped) and its attention output is put
    back at the row's place in the padded batch (padding queries get zeros). ``seen`` counts the padded columns the
    model has fed (what transformers' positions and masks are sized from); each row counts its own tokens.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, policy, trace: bool = False, make_policy: Callable[[int], LayerPolicy] | None = None) -> None:
        super().__init__()
        self.rows: list[Row] = [Row(policy, LayerMeter(trace=[] if trace else None))]
        self.trace = trace
        self.make_policy = make_policy
        # Set by the owning SieveCache (no reference back to it: a cycle would keep every dropped cache's tensors
        # alive until Python's cyclic collector happens to run).
        self.next_phase: Phase | None = None  # the phase of the forward under way (None: automatic)
        self.layout = PromptLayout()
        self.seen = 0  # padded columns fed (prompt + generated, padding included), whatever is stored
        self.row_token_bytes = 0  # K + V bytes of one token of one row in a plain cache (all KV heads)
        self._phase = Phase.DECODE
        self._first_position = 0

    # ------------------------------------------------------------------------------------------- rows
    @property
    def policy(self) -> LayerPolicy:
        """The policy of a one-row layer (a batch: ``rows[i].policy``)."""
        return self._only_row().policy

    @property
    def meter(self) -> LayerMeter:
        """The meter of a one-row layer (a batch: ``rows[i].meter``)."""
        return self._only_row().meter

    def _only_row(self) -> Row:
        if len(self.rows) != 1:
            raise RuntimeError(f"this layer holds a batch of {len(self.rows)} rows: read layer.rows[i] instead")
        return self.rows[0]

    def _add_rows(self, batch: int) -> None:
        if self.make_policy is None:
            raise RuntimeError(f"this layer cannot hold a batch ({batch} rows): it was built for one row")
        for index in range(len(self.rows), batch):
            self.rows.append(Row(self.make_policy(index), LayerMeter(trace=[] if self.trace else None)))

    # ------------------------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        k_bytes = key_states.shape[-1] * key_states.element_size()
        self.row_token_bytes = key_states.shape[1] * (k_bytes + value_states.shape[-1] * value_states.element_size())
        self.is_initialized = True

    def uncompressed_bytes(self, row: int | None = None) -> int:
        """Bytes a plain cache would hold for the tokens read (padding excluded), of one row or of all: the
        reference every method's memory is compared with, including methods whose device cache never held the whole
        prompt (InfLLM's block memory)."""
        rows = self.rows if row is None else [self.rows[row]]
        return sum(r.seen for r in rows) * self.row_token_bytes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new keys/values ``[B, H_kv, q, D]``; the rows store them at the attention call, where the mask
        says which of them are padding."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, q = key_states.shape[0], key_states.shape[-2]
        if self.seen == 0 and batch > len(self.rows):
            self._add_rows(batch)
        if batch != len(self.rows):
            raise RuntimeError(f"this SieveCache holds {len(self.rows)} batch rows and a batch of {batch} arrived")
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
        self.seen += q
        keys = key_states[:]  # a fresh tensor object, so the tag never sticks to a tensor that outlives this call
        setattr(keys, LAYER_TAG, self)
        return keys, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only the mask's last ``query_length`` columns are read (`real_tokens`); the rest just has to fit the
        # padded columns seen.
        stored = min(max(row.policy.stored_length() for row in self.rows), self.seen)
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a SieveCache cannot be reset; create a new one for a new prompt")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted generation is not supported)")

    # Batch rows move between layers together (ActQKV's layers of one row share state): `SieveCache` does it.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("reorder a SieveCache through SieveCache.reorder_cache, not layer by layer")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("select rows of a SieveCache through SieveCache.batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("repeat rows of a SieveCache through SieveCache.batch_repeat_interleave")

    # back-compat views of a one-row layer: some transformers utilities read ``layer.keys`` / ``layer.values``
    @property
    def keys(self) -> torch.Tensor | None:
        store = self.rows[0].policy.store if len(self.rows) == 1 else None
        return None if store is None or store.is_empty else store.keys

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor | None:
        store = self.rows[0].policy.store if len(self.rows) == 1 else None
        return None if store is None or store.is_empty else store.values

    @values.setter
    def values(self, value) -> None:
        pass

    # --------------------------------------------------------------------------------------- attention
    def follow(self, phase: Phase, first_position: int, seen: int) -> None:
        """Take another one-row layer's place in the forward under way (a shared prefill: this layer's policy
        observes the chunk the full cache stores)."""
        self._phase, self._first_position, self.seen = phase, first_position, seen
        self._only_row().seen = seen

    def call(self, module, query, keys, values, scaling, kwargs: dict[str, Any], row: int = 0) -> AttentionCall:
        """The `AttentionCall` of row ``row`` in the forward under way: its ``query`` ``[1, H, n, D]`` over its
        ``keys``/``values`` (as its policy's ``update`` returned them); the row's ``seen`` includes the chunk."""
        r = self.rows[row]
        return AttentionCall(
            module=module,
            query=query,
            keys=keys,
            values=values,
            scaling=scaling,
            phase=self._phase,
            first_position=r.seen - query.shape[2],
            seen=r.seen,
            kwargs=kwargs,
            record=r.meter.record,
            layout=self.layout if r.layout is None else r.layout,
        )

    def attend(
        self, module, query, keys, values, scaling, kwargs: dict[str, Any], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each row stores its real new tokens and attends over what it keeps: ``query`` ``[B, H, q, D]`` and the
        new ``keys``/``values`` ``[B, H_kv, q, D]`` (padding included); ``mask``: the forward's attention mask
        (`real_tokens`). Returns ``[B, q, H, D]``, zeros at padding queries."""
        n_new = query.shape[2]
        counts = real_tokens(mask, n_new, len(self.rows))
        if len(self.rows) == 1 and counts[0] == n_new:  # one row, no padding: no slicing, no re-assembly
            return self._attend_row(0, module, query, keys, values, scaling, kwargs)
        out = query.new_zeros(query.shape[0], n_new, query.shape[1], values.shape[-1])
        for row, n in enumerate(counts):
            if n == 0:
                if self._phase is Phase.PREFILL_LAST:
                    raise ValueError(f"batch row {row} has no token to complete its prompt with (only padding)")
                continue
            part = slice(n_new - n, n_new)
            out[row, part] = self._attend_row(
                row,
                module,
                query[row : row + 1, :, part],
                keys[row : row + 1, :, part],
                values[row : row + 1, :, part],
                scaling,
                kwargs,
            )[0]
        return out

    def _attend_row(self, row: int, module, query, key, value, scaling, kwargs: dict[str, Any]) -> torch.Tensor:
        """One row's forward: store the new ``key``/``value`` ``[1, H_kv, n, D]``, then `attend_call`."""
        r = self.rows[row]
        keys, values = r.policy.update(key, value, r.seen, self._phase)
        r.seen += query.shape[2]
        return self.attend_call(self.call(module, query, keys, values, scaling, kwargs, row), row)

    def attend_call(self, call: AttentionCall, row: int = 0) -> torch.Tensor:
        """Row ``row``'s policy over ``call`` (its new tokens stored): observe (prefill), attend, compress (the
        prompt's last chunk). Returns ``[1, n, H, D]``."""
        policy = self.rows[row].policy
        if self._phase is not Phase.DECODE:
            policy.observe(call)
        out = policy.attend(call)
        if self._phase is Phase.PREFILL_LAST:
            self.complete_prompt(call, row)
        return out

    def complete_prompt(self, call: AttentionCall, row: int = 0) -> None:
        """The prompt is complete: the row's policy compresses, its meter notes the sizes before and after."""
        r = self.rows[row]
        r.meter.bytes_before_compress = self.uncompressed_bytes(row)
        r.policy.compress(call)
        r.meter.stored_after_prefill = r.policy.stored_length()
        r.meter.bytes_after_prefill = r.policy.kv_bytes()


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

    def __init__(
        self,
        model_or_config,
        method: Method | str | None = None,
        *,
        reserve: int = 64,
        trace: bool = False,
        row_methods: Sequence[Method] | None = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_supported(text_config)
        self.method = as_method(method)
        # A batch made up front (`kvsieve.generate` on several prompts): row i runs row_methods[i], the method
        # resolved for its own prompt (a fractional InfLLM budget). Otherwise rows come with the first batch.
        self.row_methods: list[Method] = [self.method] if row_methods is None else [as_method(m) for m in row_methods]
        if not self.row_methods or any(m.name != self.method.name for m in self.row_methods):
            raise ValueError(f"row_methods must be one or more {self.method.name!r} methods, one per batch row")
        self.trace = trace
        self.shared: dict[str, Any] = {}  # per-cache state that a method shares across its layers (LayerInfo.shared)
        n_layers = text_config.num_hidden_layers
        n_heads = text_config.num_attention_heads
        n_kv = getattr(text_config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
        # One shared dict per batch row: a row's layers share method state (ActQKV's block pool), rows never do.
        self.row_shared: list[dict[str, Any]] = [self.shared]
        rows = RowPolicies(self.row_methods, reserve, self.row_shared)
        layers: list[CacheLayerMixin] = []
        for idx, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window))
            elif kind == "full_attention":
                info = LayerInfo(idx, n_layers, n_heads, n_kv, head_dim, text_config, shared=self.shared)
                layers.append(SieveLayer(rows.add_layer(info), trace, rows.for_layer(idx)))
            else:
                raise UnsupportedModelError(f"layer type {kind!r} (layer {idx}) is not supported by kvsieve")
        super().__init__(layers=layers)
        for layer in self.sieve_layers:
            layer._add_rows(len(self.row_methods))
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

    def set_layouts(self, layouts: Sequence[PromptLayout]) -> None:
        """One layout per batch row (a single row: the cache's `layout`); rows' questions start where each row's
        own tokens end."""
        if len(layouts) != self.batch_size:
            raise ValueError(f"layouts: {len(layouts)} given for a batch of {self.batch_size} rows")
        bad = next((layout for layout in layouts if not isinstance(layout, PromptLayout)), None)
        if bad is not None:
            raise TypeError(f"layout must be a kvsieve PromptLayout, got {type(bad).__name__}")
        if len(layouts) == 1:
            self.layout = layouts[0]
            return
        for layer in self.sieve_layers:
            for row, layout in zip(layer.rows, layouts):
                row.layout = layout

    def row_method(self, row: int) -> Method:
        """The method batch row ``row`` runs (resolved for its own prompt when the rows were made up front)."""
        return self.row_methods[row] if row < len(self.row_methods) else self.method

    def row_tokens_seen(self, row: int) -> int:
        """Tokens batch row ``row`` has read (its padding apart): the logical position of its next token."""
        layers = self.sieve_layers
        return layers[0].rows[row].seen if layers else 0

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

    # ------------------------------------------------------------------------------------- batch rows
    @property
    def batch_size(self) -> int:
        """Rows the cache holds (1 until a first forward brings a batch)."""
        layers = self.sieve_layers
        return len(layers[0].rows) if layers else 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes a copy of old row ``beam_idx[i]``."""
        self._take_rows(beam_idx, "reorder_cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(indices, "batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (num_return_sequences); before the first forward there is nothing
        to repeat: the rows are made from the batch that arrives."""
        if self.tokens_seen() == 0:
            return
        self._take_rows(torch.arange(self.batch_size).repeat_interleave(repeats), "batch_repeat_interleave")

    def _take_rows(self, indices: torch.Tensor, name: str) -> None:
        """New rows from old ones, all layers together: an old row taken once moves, one taken again is deep-copied
        across all its layers at once (so that what its layers share stays shared within the copy)."""
        sieve = self.sieve_layers
        if self.tokens_seen() == 0:
            return  # no row state yet (transformers may reorder before the first forward)
        sources = row_sources(indices, self.batch_size, name)
        taken: set[int] = set()
        new_rows: list[list[Row]] = [[] for _ in sieve]
        new_shared: list[dict[str, Any]] = []
        for source in sources:
            rows = [layer.rows[source] for layer in sieve]
            shared = self.row_shared[source]
            if source in taken:
                rows, shared = copy.deepcopy((rows, shared))
            taken.add(source)
            for per_layer, row in zip(new_rows, rows):
                per_layer.append(row)
            new_shared.append(shared)
        for layer, rows in zip(sieve, new_rows):
            layer.rows = rows
        self.row_shared[:] = new_shared
        if len(self.row_methods) > 1:  # in place: the RowPolicies of this cache read the same list
            self.row_methods[:] = [self.row_methods[source] for source in sources]
        index = torch.as_tensor(sources, dtype=torch.long)
        for layer in self.layers:
            if not isinstance(layer, SieveLayer) and layer.is_initialized:  # transformers' sliding-window layers
                layer.reorder_cache(index)

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

    def kv_bytes_of_row(self, row: int) -> int:
        """Bytes of K/V entries held now for batch row ``row``."""
        return sum(layer_kv_bytes(layer, row) for layer in self.layers)


class RowPolicies:
    """Makes the policies of a batch row, for all layers of a cache at once and in layer order (a method may tie its
    layers together when they are built: ActQKV's block pool counts them), with the row's own shared dict."""

    def __init__(self, methods: list[Method], reserve: int, row_shared: list[dict[str, Any]]) -> None:
        self.methods, self.reserve, self.row_shared = methods, reserve, row_shared
        self.infos: list[LayerInfo] = []
        self._built: dict[tuple[int, int], LayerPolicy] = {}  # (row, layer index) -> a policy not handed out yet

    def add_layer(self, info: LayerInfo) -> LayerPolicy:
        """Row 0's policy of a new layer (built with the cache)."""
        self.infos.append(info)
        return self.methods[0].make_policy(info, self.reserve)

    def for_layer(self, layer_idx: int) -> Callable[[int], LayerPolicy]:
        return functools.partial(self.take, layer_idx)

    def take(self, layer_idx: int, row: int) -> LayerPolicy:
        if (row, layer_idx) not in self._built:
            while len(self.row_shared) <= row:
                self.row_shared.append({})
            method = self.methods[row] if row < len(self.methods) else self.methods[0]
            for info in self.infos:
                self._built[(row, info.layer_idx)] = method.make_policy(
                    dataclasses.replace(info, shared=self.row_shared[row]), self.reserve
                )
        return self._built.pop((row, layer_idx))


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


def stored_entries(layer: CacheLayerMixin, row: int = 0) -> int:
    """Entries per KV head that batch row ``row`` of ``layer`` stores now (a sliding-window layer: its window,
    padding included)."""
    if isinstance(layer, SieveLayer):
        return layer.rows[row].policy.stored_length()
    return 0 if layer.keys is None else layer.keys.shape[-2]


def layer_kv_bytes(layer: CacheLayerMixin, row: int | None = None) -> int:
    """Bytes of K/V that ``layer`` holds now, for batch row ``row`` or all rows (None)."""
    if isinstance(layer, SieveLayer):
        rows = layer.rows if row is None else [layer.rows[row]]
        return sum(r.policy.kv_bytes() for r in rows)
    if layer.keys is None:
        return 0
    total = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total if row is None else total // layer.keys.shape[0]


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by kvsieve; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
