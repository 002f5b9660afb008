"""RefreshKV: decode over a small partial cache, refresh it with full attention when the query drifts.

RefreshKV (arXiv 2411.05787, ACL 2025; v1 titled "Recycled Attention"). Each layer keeps two caches:

* ``C_f``, the full cache: every prompt and generated token, never evicted (``self.store``);
* ``C_p``, the partial cache: ``K`` entries per KV head gathered from ``C_f`` (``self.partial``).

After the prompt's prefill, ``C_p`` holds the top-``K`` entries of the last prompt token's attention over ``C_f``
(max-pooled along positions, kernel 7, 'same' padding; reduced over each GQA group by max). Most decode steps are
*partial*: the new token attends ``C_p`` plus itself, enters ``C_p`` (and ``C_f``), and the lowest-scored selected
entry leaves ``C_p`` so that it stays at ``K``. A *full* step attends all of ``C_f``, recomputes the current token's
attention row explicitly (one query) and rebuilds ``C_p`` from it. Without refreshes this is SnapKV with an
observation window of one token followed by a rolling replacement (the paper's ablation).

When to go full (``schedule``):

* ``"fixed"``: every ``stride``-th decode step, all layers.
* ``"query_similarity"`` (default): at every ``stride``-th decode step each layer compares the mean over query heads
  of its current pre-RoPE query with the one of its last full step (cosine); above ``threshold`` it stays partial,
  otherwise that layer alone takes a full step. Steps that are not multiples of ``stride`` are always partial.

Choices the paper leaves open (spec/methods.md §3.2 [ASSUMPTION]s and kvsieve's own):

* The similarity uses **pre-RoPE** queries (the post-RoPE query rotated back by its position, `ops.rope.Rotary`).
  Right after prefill (and after a multi-token chunk) the reference query is that chunk's last token's.
* A token entering ``C_p`` at a partial step gets the score ``PROTECTED + position``: above every attention score,
  so the lowest-scored *selected* entry always leaves first, and once every selected entry is gone the oldest
  generated token leaves (a rolling window). No extra sink or recent window.
* Ties in the pooled scores (max-pooling copies a peak onto its neighbours) are broken by position: the older entry
  ranks higher, in the top-``K`` selection and in the eviction alike, so the kept set is deterministic. ``C_p``
  stores each selected entry's rank in that order (`rank_keys`), so a partial step's eviction is one ``argmin``.
* A multi-token chunk after compression (a question fed separately) is treated as the end of the prompt: it attends
  ``C_f`` (causally), ``C_p`` is rebuilt from its last token's attention, the reference query becomes that token's
  and the step counter restarts. ``K`` stays the value resolved from the prompt. With ``refresh=False`` the chunk
  attends ``C_p`` plus itself and its tokens enter ``C_p`` like generated ones.
* Batches: every batch row has its own policy (`kvsieve.rows`), so each row of each layer decides for itself.
* ``threshold=None`` picks the paper's value by model family: 0.85 for Llama (and Mistral, Gemma-3: untuned
  assumption), 0.95 for Qwen2/Qwen3.

``budget`` is ``K`` (an int: tokens per layer and KV head; a float: a fraction of the prompt, default 1/8 as in the
paper's downstream tasks). Memory is ``C_f + C_p`` (the paper's L + K): nothing is saved, decode attention is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvsieve.methods.base import (
    BUDGET_HELP,
    AttentionCall,
    LayerPolicy,
    Phase,
    check_budget,
    check_choice,
    check_float,
    check_int,
    param,
    register,
    register_preset,
    resolve_budget,
)
from kvsieve.methods.eviction import PROTECTED, BudgetedMethod
from kvsieve.ops.attention import attend
from kvsieve.ops.rope import Rotary, shared_rotary
from kvsieve.ops.scoring import attention_probs, pool_scores, reduce_gqa
from kvsieve.ops.store import KVStore

SCORE = "refreshkv_score"  # per C_p entry, its eviction key: -rank (selected, `rank_keys`) or PROTECTED + position
PARTIAL_RESERVE = 16  # spare C_p slots: a partial step holds K + 1 entries between its append and its eviction
# The paper's thresholds (Table 3, tuned on Book): Llama-3.1-8B and Qwen2-7B. Other families: an assumption.
THRESHOLDS = {"llama": 0.85, "mistral": 0.85, "gemma3_text": 0.85, "qwen2": 0.95, "qwen3": 0.95}
DEFAULT_THRESHOLD = 0.85


def default_threshold(config) -> float:
    """The query-similarity threshold ``s`` for a model: 0.85 (Llama family) or 0.95 (Qwen family)."""
    return THRESHOLDS.get(getattr(config, "model_type", None), DEFAULT_THRESHOLD)


def select_top(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best entries by score, ties to the older position: their slots ``[B, H_kv, k]`` (ascending) and
    the rank of each (``[B, H_kv, k]``, 0 the best).

    ``scores`` ``[B, H_kv, S]``, ``positions`` ``[B, H_kv, S]`` (unique per head, any order).
    """
    by_position = positions.argsort(dim=-1)
    ranked = scores.gather(-1, by_position).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    slots, rank = by_position.gather(-1, ranked).sort(dim=-1)
    return slots, rank


def top_in_slot_order(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_top` for entries stored in position order (C_f, append-only): no sort by position first."""
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    slots, rank = ranked.sort(dim=-1)
    return slots, rank


def rank_keys(rank: torch.Tensor) -> torch.Tensor:
    """C_p's eviction keys (float64) of selected entries from their `select_top` ranks: ``-rank``, unique, so that
    the lowest key is the worst entry in `select_top`'s order (lowest score, ties to the newer position) and one
    ``argmin`` finds it. Generated tokens get ``PROTECTED + position``, above every selected entry."""
    return rank.to(torch.float64).neg_()


class RefreshKVPolicy(LayerPolicy):
    """``self.store`` is ``C_f`` (every token), ``self.partial`` is ``C_p`` (``K`` entries per KV head)."""

    def __init__(self, method: RefreshKV, info, reserve: int = 64) -> None:
        super().__init__(method, info, reserve)
        self.partial = KVStore(reserve=PARTIAL_RESERVE)
        self.partial.add_aux(SCORE, torch.float64)
        self.k: int | None = None  # resolved from the prompt length at compression
        self.threshold = method.threshold if method.threshold is not None else default_threshold(info.config)
        self.rotary: Rotary | None = None  # built on first use (query-similarity schedule only)
        self.reference_query: torch.Tensor | None = None  # [B, D] mean pre-RoPE query of the last full step
        self.step = 0  # single-token decode steps since the prompt (or since the last multi-token chunk)
        # measured, for statistics
        self.full_steps = 0
        self.partial_steps = 0
        self.chunks = 0  # multi-token DECODE chunks (a question fed after compression)
        self.attended_sum = 0  # entries per KV head attended, summed over DECODE calls
        self.checks = 0
        self.similarity_sum = 0.0
        self.similarity_min = float("inf")
        self.similarity_max = float("-inf")

    # ------------------------------------------------------------------------------------------- hooks
    # update: the base class appends every new token to C_f and returns C_f (full steps attend it as is).

    def compress(self, call: AttentionCall) -> None:
        """After the prompt: ``C_p`` from the last prompt token's attention over ``C_f``."""
        self.k = resolve_budget(self.method.budget, call.seen)
        self._after_full_chunk(call)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.phase is not Phase.DECODE or self.k is None:  # prompt chunks: full attention
            return self._attend_full(call)
        if call.n_new > 1:  # a question chunk after compression: the end of the prompt (see module docstring)
            self.chunks += 1
            if not self.method.refresh:
                return self._attend_partial(call)
            out = self._attend_full(call)
            self._after_full_chunk(call)
            return out
        self.step += 1
        query = self._full_step_due(call)
        if query is None:
            self.partial_steps += 1
            return self._attend_partial(call)
        self.full_steps += 1
        out = self._attend_full(call)
        self._rebuild(call.query, call.scaling)
        if isinstance(query, torch.Tensor):
            self.reference_query = query
        return out

    # ------------------------------------------------------------------------------------------- steps
    def _attend_full(self, call: AttentionCall) -> torch.Tensor:
        """Attention over ``C_f`` (which already holds the new tokens): what the full cache computes."""
        call.record(self.store.positions)
        if call.phase is Phase.DECODE:
            self.attended_sum += self.store.length
        return attend(call.module, call.query, call.keys, call.values, call.scaling, **call.kwargs)

    def _attend_partial(self, call: AttentionCall) -> torch.Tensor:
        """Attention over ``C_p`` plus the new tokens; they stay in ``C_p``, which then shrinks back to ``K``."""
        q, cp = call.n_new, self.partial
        cp.append(self.store.keys[:, :, -q:], self.store.values[:, :, -q:], call.first_position)
        first = PROTECTED + call.first_position  # exact in float64 (below 2**53)
        cp.aux(SCORE)[:, :, -q:] = torch.arange(first, first + q, dtype=torch.float64, device=cp.positions.device)
        call.record(cp.positions)
        self.attended_sum += cp.length
        out = attend(call.module, call.query, cp.keys, cp.values, call.scaling, **call.kwargs)
        excess = cp.length - self.k
        if excess == 1:  # the decode step: move one entry, no gather
            cp.evict(cp.aux(SCORE).argmin(dim=-1))  # the keys are unique: no tie to break
        elif excess > 1:
            cp.keep(select_top(cp.aux(SCORE), cp.positions, self.k)[0], reserve=PARTIAL_RESERVE)
        return out

    def _after_full_chunk(self, call: AttentionCall) -> None:
        """After a prompt (or question) chunk attended ``C_f``: rebuild ``C_p`` and restart the schedule there."""
        last = call.query[:, :, -1:]
        self._rebuild(last, call.scaling)
        self.step = 0
        if self.method.schedule == "query_similarity":
            self.reference_query = self._mean_pre_rope(last, call.seen - 1)

    def _rebuild(self, query: torch.Tensor, scaling: float) -> None:
        """``C_p`` <- the top-``K`` entries of ``C_f`` under ``query``'s attention (``[B, H, 1, D]``, the newest token).

        The row is recomputed explicitly (sdpa does not return it): ``[B, H, S]`` floats, one query.
        """
        cf = self.store
        probs = attention_probs(query, cf.keys, scaling)[:, :, 0]  # the newest token sees every entry
        pooled = pool_scores(probs, self.method.kernel_size, "max")
        scores = reduce_gqa(pooled, self.info.n_kv_heads, self.method.gqa_reduce)  # [B, H_kv, S]
        # everything fits: the slots are 0..S-1, C_f's order (bit-identical attention to the full cache)
        slots, rank = top_in_slot_order(scores, min(self.k, cf.length))  # C_f's slots are in position order
        d, dv = cf.keys.shape[-1], cf.values.shape[-1]
        cp = self.partial
        cp.length = 0  # reuse C_p's buffer: refreshes happen every few steps
        cp.append(
            cf.keys.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, d)),
            cf.values.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, dv)),
            0,
        )
        cp.positions.copy_(cf.positions.gather(2, slots))
        cp.aux(SCORE).copy_(rank_keys(rank))

    # ---------------------------------------------------------------------------------------- schedule
    def _full_step_due(self, call: AttentionCall) -> torch.Tensor | bool | None:
        """None: a partial step. Otherwise a full step, with the current mean pre-RoPE query ``[B, D]`` when the
        query-similarity schedule measured it (it becomes the reference), else True."""
        if not self.method.refresh or self.step % self.method.stride:
            return None
        if self.method.schedule == "fixed":
            return True
        query = self._mean_pre_rope(call.query, call.first_position)
        similarity = F.cosine_similarity(query, self.reference_query, dim=-1)  # [B]
        worst = similarity.min().item()  # the decision is control flow: one host sync per check and layer
        self.checks += 1
        self.similarity_sum += worst
        self.similarity_min = min(self.similarity_min, worst)
        self.similarity_max = max(self.similarity_max, worst)
        return query if worst <= self.threshold else None

    def _mean_pre_rope(self, query: torch.Tensor, position: int) -> torch.Tensor:
        """Mean over heads of one token's pre-RoPE query: ``[B, H, 1, D]`` at ``position`` -> ``[B, D]`` (float32)."""
        if self.rotary is None:
            config = self.info.config
            layer_types = getattr(config, "layer_types", None)
            self.rotary = shared_rotary(self.info, layer_types[self.info.layer_idx] if layer_types else None)
        return self.rotary.unrotate(query.float(), range(position, position + 1)).mean(dim=1)[:, 0]

    # -------------------------------------------------------------------------------------- accounting
    def stored_length(self) -> int:
        """``C_f``'s length: every token stays on the device. (This is also what ``get_mask_sizes`` needs: the
        transformers mask then spans every key, so its padding check sees every position.)"""
        return self.store.length

    def kv_bytes(self) -> int:
        return self.store.used_bytes() + self.partial.used_bytes()

    def allocated_bytes(self) -> int:
        return self.store.allocated_bytes() + self.partial.allocated_bytes()

    def stats(self) -> dict[str, Any]:
        steps = self.full_steps + self.partial_steps
        calls = steps + self.chunks
        out: dict[str, Any] = {
            "budget_tokens": self.k,
            "schedule": self.method.schedule if self.method.refresh else "none",
            "full_steps": self.full_steps,
            "partial_steps": self.partial_steps,
            "chunks": self.chunks,
            "full_fraction": self.full_steps / steps if steps else None,
            "attended_mean": self.attended_sum / calls if calls else None,
            "full_cache_tokens": self.store.length,
            "partial_cache_tokens": self.partial.length,
            "full_cache_bytes": self.store.used_bytes(),
            "partial_cache_bytes": self.partial.used_bytes(),
        }
        if self.method.refresh and self.method.schedule == "query_similarity":
            out["threshold"] = self.threshold
            out["query_checks"] = self.checks
            if self.checks:
                out["query_similarity_mean"] = self.similarity_sum / self.checks
                out["query_similarity_min"] = self.similarity_min
                out["query_similarity_max"] = self.similarity_max
        return out


@register
@dataclass
class RefreshKV(BudgetedMethod):
    """Full cache + a ``K``-entry partial cache decoded from, refreshed by full-attention steps.

    ``budget``: ``K`` (int tokens, or a float fraction of the prompt). ``schedule``: ``"query_similarity"`` or
    ``"fixed"``. ``stride``: ``S``, the decode steps between checks (or full steps). ``threshold``: ``s`` (None:
    0.85 for Llama-family models, 0.95 for Qwen-family). ``kernel_size``: max-pooling along positions.
    ``gqa_reduce``: how a GQA group's attention is combined. ``refresh=False``: never a full step after the prompt.
    """

    name = "refreshkv"
    summary = "Full cache + small partial cache; full-attention steps refresh it when the query drifts"
    paper = "arXiv 2411.05787 (ACL 2025)"
    policy = RefreshKVPolicy
    budget_counts = "entries a partial decode step attends (K); the full cache is stored as well"
    shares_prefill = True

    budget: int | float = param(0.125, BUDGET_HELP + " (K, the partial cache)")
    schedule: str = param("query_similarity", "when a layer goes full: query_similarity (per layer) or fixed")
    stride: int = param(10, "decode steps between checks (query_similarity) or full steps (fixed)")
    threshold: float | None = param(None, "cosine below which a layer refreshes (None: 0.85 Llama, 0.95 Qwen)")
    kernel_size: int = param(7, "max-pooling kernel along positions when the partial cache is rebuilt (odd)")
    gqa_reduce: str = param("max", "how a KV head combines its query heads' scores: max, mean or sum")
    refresh: bool = param(True, "False: never a full step after the prompt (the ablation baseline)")

    def validate(self) -> None:
        check_budget(self.budget)
        check_choice("schedule", self.schedule, ("query_similarity", "fixed"))
        check_int("stride", self.stride, 1)
        if self.threshold is not None:
            # above 1: every check goes full (a cosine is at most 1)
            check_float("threshold", self.threshold, -1.0, None)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        check_choice("gqa_reduce", self.gqa_reduce, ("max", "mean", "sum"))
        if not isinstance(self.refresh, bool):
            raise TypeError(f"refresh must be True or False, got {self.refresh!r}")


register_preset(
    "refreshkv-fixed",
    RefreshKV,
    "RefreshKV with the fixed schedule: every layer takes a full step every `stride` (10) decode steps",
    schedule="fixed",
)
register_preset(
    "refreshkv-norefresh",
    RefreshKV,
    "RefreshKV's rolling partial cache that is never refreshed (the paper's ablation baseline): refresh=False",
    refresh=False,
)
register_preset(
    "refreshkv-qc5",
    RefreshKV,
    "RefreshKV checking query similarity every 5 decode steps (the paper's QC=5; the default checks every 10)",
    stride=5,
)
