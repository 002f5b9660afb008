"""The method protocol: a `Method` is configuration, a `LayerPolicy` is its per-layer, per-cache state.

A `Method` (a dataclass: its paper's hyper-parameters, validated on construction) creates one `LayerPolicy` per
attention layer of a `SieveCache`. The cache layer calls the policy at three points of every forward:

* ``update(key, value, first_position, phase)`` -- the new tokens' post-RoPE keys/values arrive (from the model's
  ``cache.update``); the policy stores what it keeps and returns the keys/values the attention function receives.
* ``attend(call)`` -- the registered attention function hands over the real post-RoPE queries; the policy
  computes the attention output (and records whatever scores it needs).
* ``observe(call)`` before ``attend`` during prefill chunks, and ``compress(call)`` after ``attend`` of the chunk
  that completes the prompt: one-shot methods score there and evict, layer by layer.

State lives in the policy, never in module globals, so two caches (or two threads) never interfere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvsieve.budget import Budget
from kvsieve.ops.attention import attend
from kvsieve.ops.store import KVStore

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Phase(enum.Enum):
    """What the current forward is, as seen by one layer."""

    PREFILL = "prefill"  # a chunk of the prompt; more prompt follows
    PREFILL_LAST = "prefill_last"  # the chunk that completes the prompt: one-shot methods compress after it
    DECODE = "decode"  # generated tokens, or a question chunk fed after the compressed context


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one attention layer that a policy needs."""

    layer_idx: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    config: PretrainedConfig | None = None
    # One dict per SieveCache, the same object for all its layers: state a method ties across layers within one
    # cache (e.g. ActQKV's per-step block pool), never across caches.
    shared: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class PromptLayout:
    """What the cache knows about the prompt's parts, the one channel through which a policy learns of the
    question: ``question`` is its logical ``[start, end)``, inside the compressed prompt (query-aware use) or fed as
    its own chunk after it (query-agnostic use); None when there is no separate question."""

    question: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        span = self.question
        if span is not None and not (
            isinstance(span, tuple)
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            and 0 <= span[0] < span[1]
        ):
            raise ValueError(f"question must be a (start, end) pair of token positions, 0 <= start < end; got {span!r}")

    @classmethod
    def question_after(cls, n_before: int, n_question: int) -> PromptLayout:
        """The layout of a question of ``n_question`` tokens that follows the first ``n_before`` tokens."""
        return cls(question=(n_before, n_before + n_question))


@dataclass
class AttentionCall:
    """One attention computation of one layer: what the registered attention function received.

    ``query`` ``[B, H, q, D]`` post-RoPE; ``keys``/``values`` ``[B, H_kv, S, D]`` as the policy's ``update``
    returned them; ``first_position`` is the logical position of the first query token; ``seen`` the number of
    tokens the layer has seen including this chunk.
    """

    module: torch.nn.Module
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float | None
    phase: Phase
    first_position: int
    seen: int
    kwargs: dict[str, Any]
    record: Callable[..., None]  # the positions ``[B, H_kv, S]`` this call attended (`LayerMeter.record`)
    layout: PromptLayout = PromptLayout()  # the prompt's parts (``SieveCache.layout``)
    output: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    @property
    def n_new(self) -> int:
        return self.query.shape[2]

    @property
    def question_span(self) -> tuple[int, int] | None:
        """The question's logical ``[start, end)`` (from the cache's layout), or None."""
        return self.layout.question


class LayerPolicy:
    """Per-layer state of a method. The default stores everything and attends to everything (the full cache)."""

    # ``observe`` reads ``call.lse`` (and sets it when absent): a shared prefill computes it with the attention
    observes_lse = False

    def __init__(self, method: Method, info: LayerInfo, reserve: int = 64) -> None:
        self.method = method
        self.info = info
        self.store = KVStore(reserve=reserve)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, first_position: int, phase: Phase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.store.append(key, value, first_position)
        return self.store.keys, self.store.values

    def attend(self, call: AttentionCall) -> torch.Tensor:
        call.record(self.store.positions)
        if call.output is not None:
            return call.output
        return attend(call.module, call.query, call.keys, call.values, call.scaling, **call.kwargs)

    def observe(self, call: AttentionCall) -> None:
        """Prefill chunks only, before ``attend``: see the prompt's queries (one-shot scoring)."""

    def compress(self, call: AttentionCall) -> None:
        """After ``attend`` of the chunk that completes the prompt: evict."""

    # -------------------------------------------------------------------------------------- accounting
    def stored_length(self) -> int:
        """Entries per KV head that stay on the device (what later tokens can attend)."""
        return self.store.length

    def kv_bytes(self) -> int:
        """Bytes of the K/V entries this layer holds (all copies: a method with two caches counts both)."""
        return self.store.used_bytes()

    def allocated_bytes(self) -> int:
        return self.store.allocated_bytes()

    def stats(self) -> dict[str, Any]:
        """Method-specific per-layer statistics (measured), merged into the cache's statistics."""
        return {}


# ------------------------------------------------------------------------------------------ the Method
@dataclass
class Method:
    """A KV-cache method's configuration. Subclasses are dataclasses with their paper's defaults."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    policy: ClassVar[type[LayerPolicy]] = LayerPolicy
    # NACL with a separate question: the question's tokens are the proxy queries, so compression happens after
    # the question chunk instead of before it.
    compress_after_question: ClassVar[bool] = False
    # True when the policy's prefill is the plain append of `LayerPolicy.update` with full attention and all the
    # method's work happens in ``observe``/``compress``: several such methods can then share one prompt forward
    # (`kvsieve.prefill_sharing`). Methods that store or attend the prompt their own way (InfLLM) leave it False.
    shares_prefill: ClassVar[bool] = False
    # True when the method keeps working past the model's trained window (``max_position_embeddings``); the
    # evaluation harness skips longer prompts for the others.
    extrapolates: ClassVar[bool] = False
    # What ``budget`` counts for this method: entries stored per layer and KV head, or entries a decode step
    # attends (`kvsieve methods` prints it). Empty: the method has no budget.
    budget_counts: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and the allowed range for any bad value."""

    def make_policy(self, info: LayerInfo, reserve: int = 64) -> LayerPolicy:
        return self.policy(self, info, reserve)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def param_help(cls) -> dict[str, str]:
        """One line per parameter saying what it means (`param`'s ``help``, looked up through the base classes
        where a subclass only changes a default)."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = next(
                (
                    k.__dataclass_fields__[f.name].metadata.get("help", "")
                    for k in cls.__mro__
                    if f.name in getattr(k, "__dataclass_fields__", {})
                    and k.__dataclass_fields__[f.name].metadata.get("help")
                ),
                "",
            )
        return out

    def for_prompt(self, prompt_tokens: int) -> Method:
        """This method as it runs on a prompt of ``prompt_tokens`` tokens (context and question together).

        One-shot methods resolve a fractional budget when they compress, so they return themselves. Methods whose
        per-step structure follows from the budget before any token is seen (InfLLM's block count) resolve it
        here; `kvsieve.generate` and the evaluation harness call this, ``SieveCache`` users call it themselves.
        """
        return self

    @property
    def budget_label(self) -> int | float | None:
        return getattr(self, "budget", None)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


def param(default: Any, help: str) -> Any:
    """A method parameter: its default and one line saying what it means (shown by `kvsieve methods`)."""
    return field(default=default, metadata={"help": help})


BUDGET_HELP = "KV entries per layer and KV head: an int is tokens, a float in (0, 1] a fraction of the prompt"


# --------------------------------------------------------------------------------------------- budgets
def check_budget(budget: Any, name: str = "budget") -> None:
    """A budget is an int >= 1 (tokens per layer and KV head) or a float in (0, 1] (a fraction of the prompt);
    see `kvsieve.Budget`. Raises TypeError or ValueError naming ``name``."""
    Budget.from_number(budget, name)


def resolve_budget(budget: int | float, n_tokens: int) -> int:
    """Tokens per layer and KV head for a prompt of ``n_tokens`` (a fraction rounds, and is at least 1)."""
    return Budget.from_number(budget).resolve(n_tokens)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{_fmt(low)}, {_fmt(high)}], got {value}")


def check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    if bad_low or (high is not None and value > high) or math.isnan(value):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{_fmt(low)}, {_fmt(high)}], got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _fmt(bound: float | None) -> str:
    return "inf" if bound is None else str(bound)


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MethodInfo:
    """What `kvsieve.methods()` lists: a name, a one-line summary, the paper and the parameters with defaults;
    what each parameter means (``param_help``) and what the budget counts (``budget_counts``, empty: no budget);
    for a preset, the method it configures (``preset_of``) and the values it sets (``preset_params``)."""

    name: str
    summary: str
    paper: str
    params: dict[str, Any] = field(default_factory=dict)
    param_help: dict[str, str] = field(default_factory=dict)
    budget_counts: str = ""
    preset_of: str | None = None
    preset_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    cls: type[Method]
    defaults: dict[str, Any]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = _Entry(cls, {}, cls.summary)
    return cls


def unregister(name: str) -> None:
    """Remove a method or preset registered under ``name`` (a method defined for a while, e.g. in a test)."""
    if name not in _REGISTRY:
        raise ValueError(f"no method registered as {name!r}")
    del _REGISTRY[name]


def register_preset(name: str, cls: type[Method], summary: str, **defaults: Any) -> None:
    """A named configuration of a method (e.g. a paper's or a released code's settings)."""
    if name in _REGISTRY:
        raise ValueError(f"method name {name!r} is already registered")
    cls(**defaults)  # validate the preset itself at import time
    _REGISTRY[name] = _Entry(cls, defaults, summary)


def method(name: str, **params: Any) -> Method:
    """Build a method by name: ``kvsieve.method("snapkv", budget=0.2, window_size=32)``."""
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string, one of: {', '.join(sorted(_REGISTRY))}; got {name!r}")
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}")
    allowed = [f.name for f in dataclasses.fields(entry.cls)]
    unknown = [p for p in params if p not in allowed]
    if unknown:
        parts = []
        for p in unknown:
            close = difflib.get_close_matches(p, allowed, n=1)
            parts.append(f"{p!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not allowed:  # the full cache: nothing to configure, and no budget since it keeps every entry
            raise ValueError(
                f"method {name!r} takes no parameters (got {', '.join(map(repr, unknown))}): it keeps and attends "
                "every token, so it has no budget"
            )
        raise ValueError(
            f"method {name!r} has no parameter {', '.join(parts)}; its parameters are: {', '.join(allowed)}"
        )
    instance = entry.cls(**{**entry.defaults, **params})
    if name != entry.cls.name:
        object.__setattr__(instance, "name", name)  # presets report their own name
    return instance


def methods() -> list[MethodInfo]:
    """All registered methods and presets, with their parameters' defaults."""
    infos = []
    for name, entry in sorted(_REGISTRY.items()):
        defaults = {}
        for f in dataclasses.fields(entry.cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        defaults.update(entry.defaults)
        preset_of = entry.cls.name if name != entry.cls.name else None
        infos.append(
            MethodInfo(
                name,
                entry.summary,
                entry.cls.paper,
                defaults,
                entry.cls.param_help(),
                entry.cls.budget_counts,
                preset_of,
                dict(entry.defaults),
            )
        )
    return infos
