"""ActQKV: InfLLM with an activation-aware probe query and a dynamic per-layer number of retrieved blocks.

Xiao et al., "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference"
(arXiv 2502.13542; code MrXiaoaa/ActQKV). The paper's full text was not available: this is the released code's
behaviour (``spec/methods.md`` section 2), on kvsieve's InfLLM substrate (`kvsieve.methods.infllm`).

What changes relative to InfLLM:

* **Probe query.** A window's retrieval query is not the plain mean of its memory queries but a weighted mean:
  token ``t`` weighs ``b_t / sum b``, with the Activation Bias ``b_t = mean_j (q_tj - mu_j)^2 / (var_j +
  mean(var)/100)`` -- how far its query (all heads concatenated) sits from running statistics ``(mu, var)`` of the
  queries seen so far. The statistics follow the code's update rule; while they warm up the weights are uniform,
  i.e. the probe is InfLLM's mean. By default only the window that starts the statistics (the prompt's first
  window in the first layer) is read with the plain mean; ``warmup_calls`` (calls after that one: the code's
  1000) sets a longer warm-up.
* **Cosine similarity** ranks the blocks, plus ``question_weight x cos(question, repr_B)`` while the prompt is read
  (and for the last prompt token's own lookup) when the question's span is known (Q-LLM's question term). The span
  comes from the cache's prompt layout, the one channel for it (`kvsieve.PromptLayout`: ``kvsieve.generate(...,
  question=...)``, the eval runner, or ``cache.layout = PromptLayout(question=span)``). As in the code, the
  question vector is built from the span's queries read ahead from the whole chunk, at the first window that moves
  tokens out of the local window, so the term acts from the first window that retrieves.
* **Dynamic cut-off.** Each step has a pool of ``topk x L`` blocks for the ``L`` layers. Layer ``l`` (in order)
  takes ``clamp(round(w_l x remaining), min(N, min_blocks), min(N, max_blocks))`` blocks, where during decoding
  ``w_l = e_l / sum_{i >= l} e_i`` and ``e_i`` is layer i's mean normalised entropy of its block scores over its
  last ``entropy_window`` retrievals (100); during the prompt (or before every layer has a full window) the
  split is uniform, ``w_l = 1 / (L - l)``, i.e. ``topk`` blocks each unless clamped.

State is per cache: the block pool lives in ``LayerInfo.shared`` (one dict per `SieveCache`), and so do the
activation statistics with ``stats_scope="shared"`` (the default: the code pools every layer's queries into one
set of statistics); ``stats_scope="layer"`` keeps one set per layer. Deviations from the released code (details
and reasons in ``docs/methods/infllm_actqkv.md``):

* statistics start fresh for every cache and warm up on the prompt's first window only (the code's module globals
  persist across the samples of a process and warm up for 1000 calls -- about 42 windows of 24 layers, 10K tokens
  -- so in the code the first sample's prompt is read with InfLLM's mean probe and later samples start warm with
  statistics of earlier prompts); statistics are per batch row;
* the question vector is built at the first window that moves tokens out of the local window *and* has the whole
  span's queries (the code: only at the window that fills the init tokens, from the first model-level chunk; with
  the question in that chunk, as in the released setup, the two are the same window); among span tokens with equal
  accumulated scores (not yet attended: zeros) the earliest are chosen; the question term is on while the prompt
  (and a question chunk fed after it) is read and off for generated tokens (the code: off from the third model
  forward);
* the unused 2%-threshold mask is not computed; no analysis files are written;
* with fewer than 2 blocks no entropy sample is taken (the code's log(1) edge case);
* with batch > 1 the layer's block count uses the entropy averaged over rows.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvsieve.methods.base import (
    AttentionCall,
    LayerInfo,
    Phase,
    check_choice,
    check_float,
    check_int,
    param,
    register,
    register_preset,
)
from kvsieve.methods.infllm import InfLLM, InfLLMPolicy, structure_param
from kvsieve.methods.infllm_budget import MIN_BUDGET, derive_cache_blocks, derive_min_blocks, derive_structure
from kvsieve.ops.activation_bias import ActivationStats
from kvsieve.ops.grouped import cast, dot_scores
from kvsieve.ops.scoring import top_indices

SHARED_KEY = "actqkv"


def normalized_entropy(scores: torch.Tensor) -> float:
    """The entropy of ``softmax(scores)`` over the last axis (``[B, N]``, N >= 2) divided by ``log N``, batch mean.

    The code's ``-sum p log(p + 1e-10)``, as ``sum entr(p) = -sum p log p``: the 1e-10 changes the sum by at most
    ``N x 1e-10``, far below its float32 resolution (tests), and costs two ops a layer and decode step."""
    b, n = scores.shape
    p = cast(scores, torch.float32).softmax(dim=-1)
    return float(torch.special.entr(p).sum()) / (b * math.log(n))


class BlockPool:
    """The per-step block budget split across layers (code: ``adjust_tok_K`` / ``predict_current_budget``).

    ``reset(n_windows)`` at the first layer of every forward gives each window a pool of ``topk x L`` blocks;
    ``take(layer, window, entropy, n_blocks, dynamic)`` records the layer's normalised entropy (kept over the last
    ``window`` retrievals) and returns its block count, removing it from the window's pool.

    ``within_pool`` (``strict_budget``'s promise: at most ``topk`` blocks per layer on average): a layer never
    takes so many that the later layers' floors would overdraw the pool (the released rule can, when an early
    layer takes up to ``max_blocks``; with ``min_blocks <= topk`` the floors then always fit).
    """

    def __init__(self, topk: int, min_blocks: int, max_blocks: int, window: int, within_pool: bool = False) -> None:
        self.topk = topk
        self.min_blocks = min_blocks
        self.max_blocks = max_blocks
        self.window = window
        self.within_pool = within_pool
        self.samples: list[deque[float]] = []
        # per layer: the sum of its samples, kept as they come and go (summed anew every `window` samples, so
        # rounding does not drift): a layer's split reads every later layer's mean, at every step
        self.sums: list[float] = []
        self._fresh: list[int] = []  # samples since the layer's sum was summed anew
        self._full = 0  # layers with a full window of samples (a layer's, once full, stays full)
        self.remaining: list[float] = []
        self.history: list[list[int]] = []  # per reset: the counts handed out, in order (for statistics/tests)

    @property
    def n_layers(self) -> int:
        return len(self.samples)

    def add_layer(self) -> int:
        self.samples.append(deque(maxlen=self.window))
        self.sums.append(0.0)
        self._fresh.append(0)
        return len(self.samples) - 1

    def reset(self, n_windows: int) -> None:
        self.remaining = [float(self.topk * self.n_layers)] * n_windows
        self.history.append([])
        del self.history[:-64]

    def ready(self) -> bool:
        """Every layer has a full window of entropy samples (once true, it stays: samples only come in)."""
        return self._full == len(self.samples)

    def record(self, layer: int, entropy: float) -> None:
        samples = self.samples[layer]
        if len(samples) == self.window:
            self.sums[layer] -= samples[0]  # leaves the window as the new sample comes in
        elif len(samples) == self.window - 1:
            self._full += 1  # this sample fills the layer's window
        samples.append(entropy)
        self._fresh[layer] += 1
        if self._fresh[layer] >= self.window:
            self.sums[layer], self._fresh[layer] = sum(samples), 0
        else:
            self.sums[layer] += entropy

    def take(self, layer: int, window: int, entropy: float | None, n_blocks: int, dynamic: bool) -> int:
        if entropy is not None:
            self.record(layer, entropy)
        pool = self.remaining[window]
        if dynamic and self.ready():
            means = [total / self.window for total in self.sums[layer:]]  # every window is full
            total = sum(means)
            weight = means[0] / total if total > 0 else math.nan
        else:
            weight = 1.0 / (self.n_layers - layer)
        k_min, k_max = min(n_blocks, self.min_blocks), min(n_blocks, self.max_blocks)
        share = weight * pool
        k = round(share) if math.isfinite(share) else k_min
        if self.within_pool:  # leave the later layers their floors
            k_max = min(k_max, max(k_min, int(pool) - (self.n_layers - layer - 1) * k_min))
        k = max(min(k, k_max), k_min)
        self.remaining[window] = pool - k
        if self.history:
            self.history[-1].append(k)
        return k


class ActQKVShared:
    """What ActQKV's layers of one cache share (``LayerInfo.shared["actqkv"]``)."""

    def __init__(self, method: ActQKV) -> None:
        self.pool = BlockPool(
            method.blocks_per_step,
            method.min_blocks,
            method.max_blocks_per_step,
            method.entropy_window,
            within_pool=method.strict_budget,
        )
        self.activation = ActivationStats(method.stats_horizon, method.warmup_calls)


class ActQKVPolicy(InfLLMPolicy):
    def __init__(self, method: ActQKV, info: LayerInfo, reserve: int = 64) -> None:
        super().__init__(method, info, reserve)
        self.shared: ActQKVShared = info.shared.setdefault(SHARED_KEY, ActQKVShared(method))
        self.ordinal = self.shared.pool.add_layer()  # layers are built in order: 0 is the first attention layer
        self.activation = (
            self.shared.activation
            if method.stats_scope == "shared"
            else ActivationStats(method.stats_horizon, method.warmup_calls)
        )
        self.question: torch.Tensor | None = None  # [B, H * D]
        self.span: tuple[int, int] | None = None  # the question's logical [start, end), once a call names it
        self.span_queries: torch.Tensor | None = None  # [B, H, span, D] memory queries of the question tokens
        self.span_scores: torch.Tensor | None = None  # [B, H, span] their local scores, captured as they leave
        self.span_read = 0  # the span's queries are captured up to this position (exclusive)
        self.entropies: list[float] = []
        self.weighted_windows = 0  # windows whose probe used Activation-Bias weights (not the plain mean)

    # ----------------------------------------------------------------------------------------- hooks
    def begin_call(self, call: AttentionCall, n_windows: int) -> None:
        if self.ordinal == 0:
            self.shared.pool.reset(n_windows)

    def reading_prompt(self, call: AttentionCall) -> bool:
        """The prompt is being read (question term on, uniform block split): prompt chunks, and a question chunk fed
        after the compressed context; generated tokens are not."""
        span = call.question_span
        return call.phase is not Phase.DECODE or (span is not None and call.first_position < span[1])

    def on_chunk(self, call: AttentionCall, q_mem: torch.Tensor) -> None:
        """Read the question's queries ahead, from the whole chunk (code: ``global_q[:, :, q0:q1]``)."""
        if self.question is not None:
            return
        if self.span is None and self.method.question_weight != 0:
            self.span = call.question_span  # the cache's prompt layout
        if self.span is None:
            return
        q0, q1 = self.span
        first, c = call.first_position, q_mem.shape[2]
        lo, hi = max(q0, first), min(q1, first + c)
        if lo >= hi:
            return
        if self.span_queries is None:
            b, h, _, d = q_mem.shape
            self.span_queries = q_mem.new_zeros(b, h, q1 - q0, d, dtype=torch.float32)
            self.span_scores = torch.zeros(b, h, q1 - q0, dtype=torch.float32, device=q_mem.device)
        self.span_queries[:, :, lo - q0 : hi - q0] = q_mem[:, :, lo - first : hi - first].float()
        self.span_read = max(self.span_read, hi)

    def on_leave(self, first_position: int, scores: torch.Tensor) -> None:
        if self.span_scores is None or self.question is not None:
            return
        q0, q1 = self.span
        lo, hi = max(q0, first_position), min(q1, first_position + scores.shape[2])
        if lo < hi:
            self.span_scores[:, :, lo - q0 : hi - q0] = scores[:, :, lo - first_position : hi - first_position]

    def after_window(self, call: AttentionCall, end: int) -> None:
        """Build the question vector (code: ``append_global``) at the first window that moves tokens out of the
        local window, once the span's queries are in: per head, the mean memory query of its ``repr_topk``
        best-scored span tokens so far (ties, e.g. tokens no query has attended yet: the earliest)."""
        if self.span_queries is None or self.question is not None:
            return
        q0, q1 = self.span
        rs = self.recent.first_position
        leaving = self.init_len > 0 or self.init_closed or end - rs > self.method.n_local
        if self.span_read < q1 or not leaving:
            return
        lo, hi = max(q0, rs), min(q1, self.recent.end_position)
        if lo < hi:  # span tokens still in the recent buffer: their scores so far
            self.span_scores[:, :, lo - q0 : hi - q0] = self.recent.scores[:, :, lo - rs : hi - rs]
        r = min(self.method.repr_topk, q1 - q0)
        chosen = self.span_scores.sort(dim=-1, descending=True, stable=True).indices[..., :r]  # [B, H, r]
        d = self.span_queries.shape[-1]
        picked = self.span_queries.gather(2, chosen[..., None].expand(-1, -1, -1, d)).mean(dim=2)  # [B, H, D]
        self.question = picked.reshape(picked.shape[0], -1)
        self.span_queries = self.span_scores = None

    # ------------------------------------------------------------------------------------- retrieval
    def probe(self, q_mem: torch.Tensor) -> torch.Tensor:
        """Activation-Bias-weighted mean of the window's memory queries ``[B, H, w, D]`` -> ``[B, H * D]``."""
        b, h, w, d = q_mem.shape
        q = cast(q_mem, torch.float32)
        if w == 1:  # a decode step: its token's weight b / b is exactly 1, and InfLLM's mean is the query itself
            query = q.reshape(b, h * d)  # its dim of size 1 moves no element: a view
            self.weighted_windows += self.activation.update_one(query)
            return query
        flat = q.permute(0, 2, 1, 3).reshape(b, w, h * d)  # [B, w, H * D]
        if not self.activation.update(flat):  # warm-up: exactly InfLLM's probe
            return q_mem.float().mean(dim=2).reshape(b, -1)
        self.weighted_windows += 1
        return (self.activation.bias_weights(flat)[..., None] * flat).sum(dim=1)

    def similarity(self, probe: torch.Tensor) -> torch.Tensor:
        if self.method.similarity == "dot":
            return dot_scores(self.memory.reprs, probe)
        # F.normalize's x / max(|x|, 1e-12) without its Python wrapper and expand (bit-identical)
        unit = probe / torch.linalg.vector_norm(probe, dim=-1, keepdim=True).clamp_min(1e-12)
        return dot_scores(self.memory.unit_reprs, unit)

    def select_blocks(self, call: AttentionCall, q_mem: torch.Tensor, window: int) -> torch.Tensor | None:
        m = self.method
        probe = self.probe(q_mem)  # every window updates the statistics, blocks or not (as the code does)
        n = 0 if self.memory is None else self.memory.n_blocks
        b = q_mem.shape[0]
        decoding = not self.reading_prompt(call)
        if n == 0:
            if m.dynamic_topk:
                self.shared.pool.take(self.ordinal, window, None, 0, decoding)
            return None
        scores = self.similarity(probe)  # [B, N]
        if self.question is not None and not decoding:
            scores = scores + m.question_weight * self.similarity(self.question)
        if not m.dynamic_topk:
            k = min(self.topk, n)
        else:
            entropy = None
            if n >= 2:
                entropy = normalized_entropy(scores)
                self.entropies.append(entropy)
            k = self.shared.pool.take(self.ordinal, window, entropy, n, decoding)
        if k >= n:
            return torch.arange(n, device=q_mem.device)[None].expand(b, n)
        return top_indices(scores, k, ascending=False)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["activation_calls"] = self.activation.count
        out["activation_weighted_windows"] = self.weighted_windows
        out["question_vector"] = self.question is not None
        if self.entropies:
            out["entropy_mean"] = sum(self.entropies) / len(self.entropies)
        return out


@register
@dataclass
class ActQKV(InfLLM):
    """InfLLM + Activation-Bias-weighted probe queries + cosine retrieval + entropy-driven blocks per layer.

    Without a budget, the released Llama-3 config (`RELEASED`: 64 init + 512 window + 46 blocks x 32 = 2048
    entries, windows of 256, 4 representative tokens, per-layer clamp [32, 2 x topk], question weight 4); the
    device cache holds twice the most blocks a step can take (the ``actqkv-llama3-2k`` preset: the released 128).
    With a ``budget``, the structure is derived as for InfLLM (at 2048: exactly the released one, cache 128) and
    the floor ``min_blocks`` scales with ``topk`` (32 of 46); a floor above what the budget allows is refused.
    The budget is what a step attends on average over layers, as released (the pool can overdraw: an early layer
    may take up to ``max_blocks``); with ``strict_budget`` the pool never hands out more than ``topk`` blocks per
    layer and step (`BlockPool`) and the window gives up its oldest block first, as for InfLLM.

    The question term needs the question's logical ``[start, end)``, which policies read from the cache's prompt
    layout (`kvsieve.PromptLayout`; see `find_span`); without it there is no question term. ``similarity="dot"``
    with ``dynamic_topk=False`` retrieves like InfLLM (ablations).
    """

    name = "actqkv"
    summary = "InfLLM + activation-aware probe query, cosine retrieval, entropy-driven blocks per layer"
    paper = "arXiv 2502.13542"
    policy = ActQKVPolicy
    budget_counts = (
        f"entries a decode step attends, on average over layers (blocks per layer vary), plus (as released) the block "
        f"still filling, unless strict_budget; the block memory stays off the device; an int >= {MIN_BUDGET}, or a "
        f"fraction of the prompt resolved to at least {MIN_BUDGET}"
    )
    MIN_TOPK: ClassVar[int] = 1
    STRUCTURE: ClassVar[tuple[str, ...]] = (*InfLLM.STRUCTURE, "min_blocks", "max_blocks")
    # the released Llama-3 config; max_cached_block None: twice the most blocks a step takes; max_blocks None: 2 x topk
    RELEASED: ClassVar[dict[str, int | None]] = dict(
        n_init=64,
        n_local=512,
        block_size=32,
        topk=46,
        repr_topk=4,
        exc_block_size=256,
        max_cached_block=None,
        min_blocks=32,
        max_blocks=None,
    )

    n_init: int | None = structure_param("first tokens always attended (attention sinks)", "budget // 32", 64)
    n_local: int | None = structure_param(
        "sliding window of recent tokens, attended at their true distance", "budget // 4 + the rounding", 512
    )
    block_size: int | None = structure_param("tokens per memory block", "the largest power of two <= sqrt(budget)", 32)
    topk: int | None = structure_param("blocks per layer and step, on average", "the blocks that fill the budget", 46)
    exc_block_size: int | None = structure_param(
        "prompt queries per retrieval window", "the largest power of two <= n_local / 2, at most 512", 256
    )
    max_cached_block: int | None = structure_param(
        "blocks cached on the device",
        "the smallest power of two >= 2 x topk and >= max_blocks",
        "2 x max(max_blocks, min_blocks)",
    )
    question_weight: float = param(4.0, "weight of the question term in block scores while the prompt is read")
    similarity: str = param("cosine", "block scoring: cosine (ActQKV) or dot (InfLLM)")
    dynamic_topk: bool = param(True, "blocks per layer follow the entropy of its scores (False: topk each)")
    min_blocks: int | None = structure_param(
        "fewest blocks a layer takes with dynamic_topk", "round(topk x 32 / 46)", 32
    )
    max_blocks: int | None = structure_param("most blocks a layer takes with dynamic_topk", "2 x topk", "2 x topk")
    entropy_window: int = param(100, "retrievals whose score entropy a layer averages")
    stats_scope: str = param("shared", "activation statistics shared by all layers, or one set per layer")
    stats_horizon: int = param(1000, "cap on the update count of the running query statistics")
    warmup_calls: int = param(0, "calls read with the plain mean before the bias weights (released: 1000)")

    def lowest(self) -> dict[str, int]:
        return {**super().lowest(), "min_blocks": 0, "max_blocks": 1}

    def validate(self) -> None:
        if not isinstance(self.dynamic_topk, bool):
            raise TypeError(f"dynamic_topk must be a bool, got {self.dynamic_topk!r}")
        super().validate()
        check_float("question_weight", self.question_weight, 0.0)
        check_choice("similarity", self.similarity, ("cosine", "dot"))
        check_int("entropy_window", self.entropy_window, 1)
        check_choice("stats_scope", self.stats_scope, ("shared", "layer"))
        check_int("stats_horizon", self.stats_horizon, 1)
        check_int("warmup_calls", self.warmup_calls, 0)
        if self.dynamic_topk:
            self.check_floor()

    def derive(self, budget: int, given: dict[str, int]) -> dict[str, int]:
        values = derive_structure(budget, given)
        topk = values["topk"]
        values["max_blocks"] = given.get("max_blocks", 2 * topk)
        values["min_blocks"] = given.get("min_blocks", derive_min_blocks(topk))
        most = values["max_blocks"] if self.dynamic_topk else topk
        values["max_cached_block"] = given.get("max_cached_block", derive_cache_blocks(topk, most))
        return values

    def check_floor(self) -> None:
        """A floor no step can hold fails at construction, not when a step asks the device cache for more blocks
        than it holds: ``min_blocks <= max_cached_block``, and with a budget ``min_blocks <= topk`` (the floor is
        spent from a pool of ``topk`` blocks per layer). Without a budget a floor above ``max_blocks`` is the
        released rule (the Qwen2.5 config: every layer takes the floor and the pool is overdrawn)."""
        floor = self.min_blocks
        if floor is None or self.topk is None:  # a fraction: checked once for_prompt resolves it
            return
        if isinstance(self.budget, int) and floor > self.topk:
            raise ValueError(
                f"min_blocks={floor} exceeds the {self.topk} blocks per layer (topk) that budget={self.budget} allows: "
                "with a budget the per-layer floor must be <= topk; lower min_blocks or raise the budget"
            )
        if floor > self.cache_blocks:
            raise ValueError(
                f"min_blocks={floor} exceeds the device cache of {self.cache_blocks} blocks (max_cached_block): a step "
                "would need more blocks than it holds; lower min_blocks or raise max_cached_block"
            )

    @property
    def max_blocks_per_step(self) -> int:
        if not self.dynamic_topk:
            return self.blocks_per_step
        return self.max_blocks if self.max_blocks is not None else 2 * self.blocks_per_step

    @property
    def cache_blocks(self) -> int:
        """Blocks the device cache holds: ``max_cached_block``, else twice the most a step can take (the floor
        when it exceeds ``max_blocks``)."""
        if self.max_cached_block is not None:
            return self.max_cached_block
        most = self.max_blocks_per_step
        return 2 * (max(most, self.min_blocks) if self.dynamic_topk else most)


def find_span(sequence: list[int], part: list[int]) -> tuple[int, int] | None:
    """``[start, end)`` of the first occurrence of ``part`` in ``sequence`` (e.g. a question's token ids inside the
    prompt's), or None -- the span for ``kvsieve.PromptLayout(question=...)``, which ActQKV's question term reads
    (code: ``extract_question_id``)."""
    n = len(part)
    if n == 0:
        return None
    for i in range(len(sequence) - n + 1):
        if sequence[i : i + n] == part:
            return i, i + n
    return None


register_preset(
    "actqkv-llama3-2k",
    ActQKV,
    "ActQKV, the released Llama-3-8B config: 64 init + 512 window + 46 blocks x 32, 128 cached",
    **{**ActQKV.RELEASED, "max_cached_block": 128},
)
register_preset(
    "actqkv-qwen25-2k",
    ActQKV,
    "ActQKV, the released Qwen2.5-7B config: 64 init + 512 window + 23 blocks x 64, 256 cached",
    **{**ActQKV.RELEASED, "block_size": 64, "topk": 23, "max_cached_block": 256},
)
register_preset(
    "actqkv-2k",
    ActQKV,
    "ActQKV at 2K attended entries, derived: the released Llama-3 structure (64 init + 512 window + 46 blocks x 32)",
    budget=2048,
)
