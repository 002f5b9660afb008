"""Shared machinery of score-based eviction: keep the ``k`` entries of highest priority, per KV head.

An eviction method is three parts (kvpress composes presses with wrappers the same way):

* a **priority** ``priority(call) -> [B, H_kv, S]`` over the stored entries (higher is kept): the method's idea,
  the one thing its policy defines;
* **rolling** (``rolling=True``): the cap is applied again after every decode step, so the cache never holds more
  than ``k`` entries (StreamingLLM, H2O); otherwise once, right after the prompt's prefill (SnapKV, PyramidKV);
* a **per-layer schedule** (``layer_schedule``, `kvsieve.methods.schedules`): how many entries each layer keeps for
  the average budget -- ``"uniform"``, ``"pyramid"`` (PyramidKV = SnapKV + the pyramid) or any callable.

With ``k`` at least the number of stored entries nothing is gathered, so the result is bit-identical to the full
cache. Evicting one entry (the decode step) moves a single entry into the freed slot instead of gathering the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsieve.methods.base import (
    BUDGET_HELP,
    AttentionCall,
    LayerPolicy,
    Method,
    Phase,
    check_budget,
    param,
    resolve_budget,
)
from kvsieve.methods.schedules import PYRAMID_BETA, LayerSchedule, Pyramid, check_schedule, layer_entries, uniform
from kvsieve.ops.scoring import top_indices

# Priorities (float64) of protected entries (sinks, recent window) sit above any attention score (<= the number
# of queries summed, far below this); adding the position keeps ties deterministic: newer wins.
PROTECTED = 2.0**50  # exact in float64 together with any position

ROLLING_HELP = "hold the budget at every decode step (the lowest-priority entry leaves); False: once after the prompt"
SCHEDULE_HELP = (
    "per-layer budgets: uniform, pyramid (mean = budget, bottom layers keep more) or a callable "
    "(average, n_prompt, n_layers, layer_idx) -> entries"
)


@dataclass
class BudgetedMethod(Method):
    """A method whose cache holds ``budget`` entries per layer and KV head (int: tokens; float: prompt fraction)."""

    budget: int | float = param(0.2, BUDGET_HELP)

    def validate(self) -> None:
        check_budget(self.budget)


class PriorityEvictionPolicy(LayerPolicy):
    """Keeps this layer's top-``k`` entries by ``priority``; with the method's ``rolling`` after each decode step too.

    Subclasses define ``priority`` (and, when it accumulates over queries, ``after_decode_attention``).
    """

    # False when the priority exists only at the prompt's end (SnapKV's observation window): rolling is refused.
    priority_at_decode: ClassVar[bool] = True

    def __init__(self, method, info, reserve=64):
        super().__init__(method, info, reserve)
        self.k: int | None = None  # entries to keep, resolved from the budget when the prompt length is known

    def layer_budget(self, n_prompt: int) -> int:
        """This layer's entries under the method's schedule, for a prompt of ``n_prompt`` tokens."""
        average = resolve_budget(self.method.budget, n_prompt)
        return layer_entries(self.method.schedule(), average, n_prompt, self.info.n_layers, self.info.layer_idx)

    def priority(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, call: AttentionCall) -> None:
        self.k = self.layer_budget(call.seen)
        self.evict_to_budget(call)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        out = super().attend(call)
        if self.method.rolling and call.phase is Phase.DECODE:
            self.after_decode_attention(call)
            self.evict_to_budget(call)
        return out

    def after_decode_attention(self, call: AttentionCall) -> None:
        """Rolling methods: update scores with this step's queries before eviction."""

    def evict_to_budget(self, call: AttentionCall) -> None:
        if self.k is None:
            return
        excess = self.store.length - self.k
        if excess <= 0:
            return
        priority = self.priority(call)
        if excess == 1:
            self.store.evict(priority.argmin(dim=-1))
        else:
            self.store.keep(top_indices(priority, self.k))

    def stats(self) -> dict:
        return {"budget_tokens": self.k}


@dataclass
class EvictionMethod(BudgetedMethod):
    """A priority method (``policy`` a `PriorityEvictionPolicy`) composed with rolling and a per-layer schedule.

    ``budget`` is the mean over layers of the entries stored per KV head after the prompt (every layer's, under the
    uniform schedule); with ``rolling`` it holds at every decode step too.
    """

    policy: ClassVar[type[PriorityEvictionPolicy]] = PriorityEvictionPolicy

    rolling: bool = param(False, ROLLING_HELP)
    layer_schedule: str | LayerSchedule = param("uniform", SCHEDULE_HELP)  # noqa: RUF009  (a str default)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rolling, bool):
            raise TypeError(f"rolling must be a bool, got {self.rolling!r}")
        if self.rolling and not self.policy.priority_at_decode:
            raise ValueError(
                f"rolling=True: {self.name} scores the entries once, at the prompt's end, and has no priority to "
                "evict by during decoding; use a method that scores every step (streamingllm, h2o)"
            )
        check_schedule(self.layer_schedule)

    def schedule(self) -> LayerSchedule:
        """The per-layer schedule ``layer_schedule`` names (a callable is used as it is)."""
        if callable(self.layer_schedule):
            return self.layer_schedule
        return self.pyramid() if self.layer_schedule == "pyramid" else uniform

    def pyramid(self) -> Pyramid:
        """What ``layer_schedule="pyramid"`` means for this method: PyramidKV's steepness, nothing kept in every
        layer beyond each layer's share (methods with an observation window keep it everywhere)."""
        return Pyramid(beta=PYRAMID_BETA, window=0)
