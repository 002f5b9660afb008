"""H2O: heavy hitters (most attended tokens so far) + recent tokens, updated at every decode step.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv 2306.14048). Every entry accumulates the softmax attention it receives from every query
(prompt queries during prefill, then each generated token's); the cache keeps the ``budget * recent_ratio`` most
recent tokens plus the highest-scoring others (the paper splits the budget equally), and after each decode step
the lowest-scoring non-recent entry leaves. GQA: scores are reduced over each group.

Speed: prefill scores are column sums from the attention's own log-sum-exp (`kvsieve.ops.scored_attention`: the
output is sdpa's, bit for bit, computed once -- in a shared prefill once for every H2O budget -- and never the
``n x n`` matrix). On a CPU in bfloat16 the sums are the flash kernel's log-sum-exp with keys and queries swapped
(float32 products, no logit rounded: closer to the exact softmax than the release, which rounds the logits to
bfloat16); elsewhere one ``Q K^T`` per tile of ``score_block`` queries (in bfloat16/float16 in the model's dtype,
``logit - lse`` rounded once); off the CPU the tiles hold every key and as many queries as fit ~2^28 floats
(`kvsieve.ops.scored_attention.tiling`). A decode step adds one row of probabilities (its query sees every entry:
no mask) and evicts by moving one entry per head in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsieve.methods.base import AttentionCall, check_choice, check_float, check_int, param, register
from kvsieve.methods.eviction import PROTECTED, ROLLING_HELP, EvictionMethod, PriorityEvictionPolicy
from kvsieve.ops.scored_attention import attention_with_lse, prefix_column_sums
from kvsieve.ops.scoring import attention_column_sums, attention_probs, reduce_gqa

SCORE = "h2o_score"


class H2OPolicy(PriorityEvictionPolicy):
    observes_lse = True

    def __init__(self, method, info, reserve=64):
        super().__init__(method, info, reserve)
        self.store.add_aux(SCORE)

    def _accumulate(self, probs_sum: torch.Tensor) -> None:
        """Add per-query-head attention mass ``[B, H, S]`` to the stored entries' scores."""
        self.store.aux(SCORE).add_(reduce_gqa(probs_sum, self.info.n_kv_heads, self.method.gqa_reduce))

    def _accumulate_group_sums(self, group_sums: torch.Tensor) -> None:
        """Add attention mass already summed over each KV head's query heads ``[B, H_kv, S]`` (mean or sum)."""
        group = self.info.group_size
        self.store.aux(SCORE).add_(group_sums / group if self.method.gqa_reduce == "mean" else group_sums)

    def observe(self, call: AttentionCall) -> None:
        store = self.store
        if store.length == call.seen:  # nothing evicted yet: the entries are the prefix in order
            block = self.method.score_block
            if call.lse is None:  # `attend` returns this output (a shared prefill brings its own)
                call.output, call.lse = attention_with_lse(
                    call.module, call.query, call.keys, call.values, call.scaling, call.first_position, block,
                    **call.kwargs,
                )  # fmt: skip
            per_query_head = self.method.gqa_reduce == "max"  # mean and sum: the op sums each group itself
            sums = prefix_column_sums(
                call.query, call.keys, call.scaling, call.lse, call.first_position, block, per_query_head
            )
            if not per_query_head:
                self._accumulate_group_sums(sums)
                return
        else:
            sums = attention_column_sums(
                call.query, store.keys, call.scaling, call.first_position, self.method.score_block, store.positions
            )
        self._accumulate(sums)

    def after_decode_attention(self, call: AttentionCall) -> None:
        if call.n_new == 1:  # the newest token sees every stored entry: no mask
            probs = attention_probs(call.query, self.store.keys, call.scaling)[:, :, 0]
        else:  # a chunk over the compressed cache
            q_pos = torch.arange(call.first_position, call.seen, device=call.query.device)
            probs = attention_probs(call.query, self.store.keys, call.scaling, q_pos, self.store.positions).sum(2)
        self._accumulate(probs)

    def evict_to_budget(self, call: AttentionCall) -> None:
        if self.k is not None and self.store.length == self.k + 1:  # a decode step: one entry per head leaves
            # `priority`'s argmin without its float64 pass: the recent window (never all the entries, as
            # ``n_recent <= k``) cannot be the minimum, and among scores argmin takes the first minimum alike.
            n_recent = round(self.k * self.method.recent_ratio)
            recent = self.store.positions >= call.seen - n_recent
            self.store.evict(self.store.aux(SCORE).masked_fill(recent, torch.inf).argmin(dim=-1))
            return
        super().evict_to_budget(call)

    def priority(self, call: AttentionCall) -> torch.Tensor:
        n_recent = round(self.k * self.method.recent_ratio)
        positions = self.store.positions
        recent = positions >= call.seen - n_recent
        return torch.where(recent, PROTECTED + positions.double(), self.store.aux(SCORE))


@register
@dataclass
class H2O(EvictionMethod):
    """Accumulated-attention heavy hitters + recent window; ``budget`` = heavy + recent, held at every step."""

    name = "h2o"
    summary = "Heavy hitters by accumulated attention + recent tokens, updated every decode step"
    paper = "arXiv 2306.14048 (NeurIPS 2023)"
    policy = H2OPolicy
    budget_counts = "entries stored per layer and KV head (heavy hitters + recent), held at every decode step"
    shares_prefill = True

    rolling: bool = param(True, ROLLING_HELP)
    recent_ratio: float = param(0.5, "share of the budget kept for the most recent tokens; the rest: heavy hitters")
    gqa_reduce: str = param("mean", "how a KV head combines its query heads' scores: mean, max or sum")
    score_block: int = param(128, "prefill queries scored at a time (memory, not results)")

    def validate(self) -> None:
        super().validate()
        check_float("recent_ratio", self.recent_ratio, 0.0, 1.0)
        check_choice("gqa_reduce", self.gqa_reduce, ("mean", "max", "sum"))
        check_int("score_block", self.score_block, 1)
