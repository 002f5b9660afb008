"""Shared machinery of score-based eviction: keep the ``k`` entries of highest priority, per KV head.

A method defines ``priority(call) -> [B, H_kv, S]`` over the stored entries (higher is kept). The policy keeps the
top ``k`` once, right after the prompt's prefill (SnapKV, PyramidKV), and -- for rolling methods (StreamingLLM,
H2O) -- again after every decode step, so the cache never holds more than ``k`` entries. With ``k`` at least the
number of stored entries nothing is gathered, so the result is bit-identical to the full cache.

Evicting one entry (the decode step) moves a single entry into the freed slot instead of gathering the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from kvsieve.ops.attention import attend
from kvsieve.ops.scoring import top_indices

# Priorities (float64) of protected entries (sinks, recent window) sit above any attention score (<= the number
# of queries summed, far below this); adding the position keeps ties deterministic: newer wins.
PROTECTED = 2.0**50  # exact in float64 together with any position


@dataclass
class BudgetedMethod(Method):
    """A method whose cache holds ``budget`` entries per layer and KV head (int: tokens; float: prompt fraction)."""

    budget: int | float = param(0.2, BUDGET_HELP)

    def validate(self) -> None:
        check_budget(self.budget)


class PriorityEvictionPolicy(LayerPolicy):
    """Keeps the top-``k`` entries by ``priority``; ``rolling`` re-applies the cap after each decode step."""

    rolling = False

    def __init__(self, method, info, reserve=64):
        super().__init__(method, info, reserve)
        self.k: int | None = None  # entries to keep, resolved from the budget when the prompt length is known

    def layer_budget(self, n_prompt: int) -> int:
        return resolve_budget(self.method.budget, n_prompt)

    def priority(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, call: AttentionCall) -> None:
        self.k = self.layer_budget(call.seen)
        self.evict_to_budget(call)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        call.record(self.store.positions)
        out = attend(call.module, call.query, call.keys, call.values, call.scaling, **call.kwargs)
        if self.rolling and call.phase is Phase.DECODE:
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
