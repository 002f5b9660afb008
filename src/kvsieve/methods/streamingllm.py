"""StreamingLLM: attention sinks + a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
The first ``n_sink`` tokens (4 in the paper) absorb attention mass that the softmax must put somewhere; keeping
them plus the most recent ``budget - n_sink`` tokens keeps generation stable at any length. The cap holds after
prefill and after every decode step (the oldest non-sink entry leaves; ``rolling=False``: once, after the prompt,
as kvpress applies it). Keys keep their original RoPE positions (the "positions within the cache" variant of the
paper is not used: kvsieve never re-rotates keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsieve.methods.base import AttentionCall, check_int, param, register
from kvsieve.methods.eviction import PROTECTED, ROLLING_HELP, EvictionMethod, PriorityEvictionPolicy


class StreamingLLMPolicy(PriorityEvictionPolicy):
    """Rolling decode evicts the oldest non-sink entry. While every row and head holds the same positions in
    ascending order (the layout a prefill leaves), that entry's slot follows a ring on the host -- the sinks'
    slots stay, the window's slots ``[sinks, k)`` are overwritten in turn by `KVStore.evict_slot` with the newest
    entry -- so a step skips the priority, its argmin and the index tensors: the store is bit for bit the same."""

    def __init__(self, method, info, reserve=64):
        super().__init__(method, info, reserve)
        self._victim: int | None = None  # the ring's next slot; None: not known (see `_ring_start`)
        self._checked = False  # whether `_victim` reflects the store's current layout
        self._sinks = 0  # slots of the sinks, before the ring

    def priority(self, call: AttentionCall) -> torch.Tensor:
        positions = self.store.positions.double()  # [B, H_kv, S]: newer is kept
        return torch.where(positions < self.method.n_sink, PROTECTED + positions, positions)

    def evict_to_budget(self, call: AttentionCall) -> None:
        if self.k is not None and self.store.length == self.k + 1:
            if not self._checked:
                self._victim, self._checked = self._ring_start(), True
            if self._victim is not None:
                slot = self._victim
                self.store.evict_slot(slot)
                self._victim = slot + 1 if slot + 1 < self.k else self._sinks
                return
        reorders = self.k is not None and self.store.length > self.k + 1  # `keep`: the layout is checked again
        super().evict_to_budget(call)
        if reorders:
            self._checked = False

    def _ring_start(self) -> int | None:
        """The slot of the oldest non-sink entry if the layout is the plain one (one device sync per check)."""
        positions = self.store.positions  # [B, H_kv, k + 1]
        first = positions[:1, :1]
        same = bool((positions == first).all())
        ascending = bool((first[..., 1:] > first[..., :-1]).all())
        self._sinks = int((first < self.method.n_sink).sum())
        return self._sinks if same and ascending and self._sinks < self.k else None


@register
@dataclass
class StreamingLLM(EvictionMethod):
    """Sink tokens + recent window; ``budget`` = n_sink + recent, held after prefill and at every decode step."""

    name = "streamingllm"
    summary = "Attention sinks + recent window, rolling during decode"
    paper = "arXiv 2309.17453 (ICLR 2024)"
    policy = StreamingLLMPolicy
    budget_counts = "entries stored per layer and KV head (sink + recent), held at every decode step"
    shares_prefill = True

    rolling: bool = param(True, ROLLING_HELP)
    n_sink: int = param(4, "first tokens always kept (attention sinks); the rest of the budget is the recent window")

    def validate(self) -> None:
        super().validate()
        check_int("n_sink", self.n_sink, 0)
