"""SnapKV: keep the prompt entries that the last window of prompt queries attends to most.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469).
After the prompt's prefill, per layer: the last ``window_size`` queries' softmax attention over the prefix keys is
summed over the window, max-pooled along the sequence (kernel ``kernel_size``: neighbouring tokens of a selected
one come along, which keeps spans such as numbers intact), reduced over each GQA group, and the top
``budget - window`` prefix entries per KV head are kept together with the window itself. One shot: tokens added
later (a question chunk, generated tokens) are appended and never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsieve.methods.base import AttentionCall, check_choice, check_int, param, register, register_preset
from kvsieve.methods.eviction import PROTECTED, EvictionMethod, PriorityEvictionPolicy
from kvsieve.methods.schedules import PYRAMID_BETA, Pyramid
from kvsieve.ops.scoring import attention_probs, pool_scores, reduce_gqa


class SnapKVPolicy(PriorityEvictionPolicy):
    priority_at_decode = False  # the observation window's queries are the prompt's last ones, gone after it

    def __init__(self, method, info, reserve=64):
        super().__init__(method, info, reserve)
        self.window_queries: torch.Tensor | None = None  # [B, H, <=w, D], the latest prompt queries
        self.window_first = 0  # logical position of window_queries[:, :, 0]

    def observe(self, call: AttentionCall) -> None:
        w = self.method.window_size
        queries = call.query if self.window_queries is None else torch.cat([self.window_queries, call.query], dim=2)
        end = call.first_position + call.n_new
        self.window_queries = queries[:, :, -w:]
        self.window_first = end - self.window_queries.shape[2]

    def priority(self, call: AttentionCall) -> torch.Tensor:
        """``[B, H_kv, S]``: pooled window attention for the prefix, protected (newest first) for the window.

        As the released SnapKV code scores (``attn_weights[..., -w:, :-w].sum(-2)``, then pooled): the softmax runs
        over every key the window sees, but only the prefix columns are pooled, so the window's own (large, local)
        attention never spills into the ``kernel // 2`` prefix entries just before it, and average pooling counts
        the zero padding. kvpress pools the same way (``docs/results/kvpress_crosscheck.md``).
        """
        store = self.store
        positions = store.positions  # prompt order: index == position while nothing has been evicted
        first = self.window_first
        q_pos = torch.arange(first, first + self.window_queries.shape[2], device=positions.device)
        probs = attention_probs(self.window_queries, store.keys, call.scaling, q_pos, positions)  # [B, H, w, S]
        n_prefix = positions.shape[-1] - q_pos.numel()  # the window is the newest entries of the stored prompt
        prefix = pool_scores(probs.sum(dim=2)[..., :n_prefix], self.method.kernel_size, self.method.pooling)
        prefix = reduce_gqa(prefix, self.info.n_kv_heads, self.method.gqa_reduce).double()
        self.window_queries = None  # one shot: free the queries
        window = PROTECTED + positions[..., n_prefix:].double()
        return torch.cat([prefix, window], dim=-1)


@register
@dataclass
class SnapKV(EvictionMethod):
    """Observation-window scoring after prefill; ``budget`` = window + top-(budget - window) prefix entries."""

    name = "snapkv"
    summary = "Observation-window attention, max-pooled, top-k per KV head after prefill"
    paper = "arXiv 2404.14469 (NeurIPS 2024)"
    policy = SnapKVPolicy
    budget_counts = "entries stored per layer and KV head after the prompt (window + top-k); later tokens are added"
    shares_prefill = True

    window_size: int = param(32, "last prompt queries whose attention scores the prefix; they are kept too")
    kernel_size: int = param(7, "pooling kernel along positions (odd): neighbours of a chosen entry come along")
    pooling: str = param("max", "max or avg pooling of the window's attention")
    gqa_reduce: str = param("mean", "how a KV head combines its query heads' scores: mean, max or sum")

    def validate(self) -> None:
        super().validate()
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        check_choice("pooling", self.pooling, ("max", "avg"))
        check_choice("gqa_reduce", self.gqa_reduce, ("mean", "max", "sum"))

    def pyramid(self) -> Pyramid:
        """The pyramid keeps the observation window in every layer and shares the rest (PyramidKV)."""
        return Pyramid(beta=PYRAMID_BETA, window=self.window_size)


register_preset(
    "snapkv-w1",
    SnapKV,
    "SnapKV with an observation window of 1 (the last prompt token), kernel 7, max over the query group: "
    "RefreshKV's SnapKV baseline",
    window_size=1,
    gqa_reduce="max",
)
