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
    def priority(self, call: AttentionCall) -> torch.Tensor:
        positions = self.store.positions.double()  # [B, H_kv, S]: newer is kept
        return torch.where(positions < self.method.n_sink, PROTECTED + positions, positions)


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
