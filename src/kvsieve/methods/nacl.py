"""NACL: one eviction at encoding time, by proxy-token attention plus a random sample drawn from it.

Chen et al., "NACL: A General and Effective KV Cache Eviction Framework for LLMs at Inference Time", ACL 2024
(arXiv 2408.03675); released code PaddlePaddle/Research ``NLP/ACL2024-NACL``.

Right after the prompt's prefill -- layer by layer, once, independently per KV head -- the cache keeps

* the ``sink`` first tokens and the ``recent`` last tokens (protected),
* the ``C_p`` candidates with the highest proxy score ``F(j) = sum_p softmax(q_p K^T / sqrt(d))_j``, where the
  proxies ``p`` are the question's tokens (paper) or the last ``proxy_ratio`` of the prompt (released code),
* ``C_r`` more candidates drawn without replacement with probability ``softmax(F)`` over those left (no
  temperature). Random eviction keeps some of the long tail that a deterministic top-k always drops.

The prompt's own prefill attends fully; tokens that come later (generated tokens, a question in query-agnostic
use) are appended and never evicted, as in the released code (the paper's Alg. 1 mentions decode-time eviction
every ``m`` steps without giving ``m``).

Assumptions and deviations (see docs/methods/nacl.md):

* Proxy attention is causal (the paper's A; the code attends non-causally over all keys). Only keys inside the
  proxy span differ, and those are mostly protected.
* GQA: a KV head's score sums ``F`` over the query heads of its group (``gqa="sum"``). ``gqa="code"`` reproduces
  the released code's indexing, which scores KV head ``k`` with query head ``k`` (spec §4.3).
* The code's ``sink_tokens=256`` with ``token_protect_ratio=0.01`` gives a negative recent window below 25.6K
  tokens; here the sink takes at most half of the protected part.
* Sampling uses the Gumbel-top-k form of sequential draws without replacement (same distribution as the code's
  ``np.random.choice(replace=False, p=softmax(F))``), in log space, so probabilities that underflow in
  ``softmax(F)`` never make the draw fail; a ``torch.Generator`` seeded from ``(seed, layer)`` makes it
  reproducible.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from kvsieve.methods.base import (
    BUDGET_HELP,
    AttentionCall,
    LayerInfo,
    LayerPolicy,
    check_choice,
    check_float,
    check_int,
    param,
    register,
    register_preset,
    resolve_budget,
)
from kvsieve.methods.eviction import BudgetedMethod
from kvsieve.ops.scoring import attention_column_sums, reduce_gqa

# Default split of the budget among the parts left at None: the released code's 1% : 12% : 7% of its 20% budget.
DEFAULT_SHARES = (0.05, 0.60, 0.35)
PARTS = ("protect", "proxy_keep", "random_keep")


# ------------------------------------------------------------------------------------------ pure functions
def proxy_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    query_start: int,
    gqa: str = "sum",
    block: int = 512,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """NACL's proxy score per KV head: ``[B, H_kv, S]`` (float32).

    ``query`` ``[B, H, p, D]``: post-RoPE queries of the proxy tokens at positions ``query_start ..
    query_start + p - 1``; ``keys`` ``[B, H_kv, S, D]``. Each proxy's causal softmax over the keys is summed over
    the proxies (``block`` queries at a time, never ``p x S`` at once), then per KV head: ``"sum"`` over the query
    heads of its group, ``"code"`` the released code's query head ``k`` for KV head ``k``.
    """
    n_kv = keys.shape[1]
    if gqa == "sum":
        sums = attention_column_sums(query, keys, scaling, query_start, block, key_positions)  # [B, H, S]
        return reduce_gqa(sums, n_kv, "sum")
    if gqa == "code":
        # only query heads 0..H_kv-1 are used; query head h reads KV head h // g
        kv_of = torch.arange(n_kv, device=keys.device) // (query.shape[1] // n_kv)
        positions = None if key_positions is None else key_positions[:, kv_of]
        return attention_column_sums(query[:, :n_kv], keys[:, kv_of], scaling, query_start, block, positions)
    raise ValueError(f"gqa must be 'sum' or 'code', got {gqa!r}")


def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, layer_idx)``: the same kept set on every run and device."""
    digest = hashlib.sha256(f"kvsieve-nacl:{seed}:{layer_idx}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise (float64), drawn on the CPU from ``generator`` and moved to ``device``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu")
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    return (-torch.log(-torch.log(u))).to(device)


@dataclass
class Selection:
    """Kept indices per head (``[B, H_kv, k]``, ascending) and where they came from."""

    kept: torch.Tensor
    top: torch.Tensor  # [B, H_kv, C_p]: the proxy-score top-k among the candidates
    random: torch.Tensor  # [B, H_kv, C_r]: the sample drawn from softmax(F) over the remaining candidates


def select_kept(
    scores: torch.Tensor, n_sink: int, n_recent: int, n_top: int, n_random: int, generator: torch.Generator
) -> Selection:
    """NACL's kept set per head from proxy scores ``[B, H_kv, n]`` over a prompt stored in order (index = position).

    Candidates are positions ``[n_sink, n - n_recent)``. The top ``n_top`` candidates by score are kept, then
    ``n_random`` of the others are drawn without replacement with probability ``softmax(scores)`` over them: the
    Gumbel-top-k trick (add Gumbel noise to the log-probabilities, keep the ``n_random`` largest) has exactly the
    distribution of sequential draws, each from the softmax renormalised over what is left.
    """
    b, h, n = scores.shape
    if n_sink + n_recent + n_top + n_random > n or min(n_sink, n_recent, n_top, n_random) < 0:
        raise ValueError(f"parts {n_sink}+{n_recent}+{n_top}+{n_random} do not fit a prompt of {n} tokens")
    device = scores.device
    positions = torch.arange(n, device=device)
    candidate = (positions >= n_sink) & (positions < n - n_recent)
    ranked = scores.double().masked_fill(~candidate, -math.inf)
    top = torch.topk(ranked, n_top, dim=-1).indices if n_top else ranked.new_empty(b, h, 0, dtype=torch.long)
    rest = ranked.scatter(-1, top, -math.inf)  # log-probabilities up to a constant; -inf: not drawable
    noise = gumbel_noise((b, h, n), generator, device)
    drawn = torch.topk(rest + noise, n_random, dim=-1).indices if n_random else top[..., :0]
    protected = torch.cat([positions[:n_sink], positions[n - n_recent :]]).expand(b, h, -1)
    kept = torch.cat([protected, top, drawn], dim=-1).sort(dim=-1).values
    return Selection(kept=kept, top=top, random=drawn)


# ------------------------------------------------------------------------------------------------ policy
class NACLPolicy(LayerPolicy):
    """Buffers the queries that can still be proxies during prefill, scores and evicts once at ``compress``."""

    def __init__(self, method: NACL, info: LayerInfo, reserve: int = 64) -> None:
        super().__init__(method, info, reserve)
        # Rolling buffer of the latest prompt queries [B, H, m, D] and the position of the first one. A token at
        # position i can be a proxy only if i >= (1 - proxy_ratio) * n >= (1 - proxy_ratio) * seen, so older
        # queries are dropped: at most proxy_ratio * n + one chunk of queries are ever held.
        self.queries: torch.Tensor | None = None
        self.queries_first = 0
        self._stats: dict[str, Any] = {}

    def observe(self, call: AttentionCall) -> None:
        q = call.query
        first = call.first_position
        if self.queries is not None:
            q = torch.cat([self.queries, q], dim=2)
            first = self.queries_first
        oldest = max(0, math.floor((1.0 - self.method.proxy_ratio) * call.seen) - 1)
        oldest = min(oldest, call.seen - 1)  # the last token is always a proxy
        span = call.question_span
        if self.method.proxy_source == "question" and span is not None and span[0] < call.seen:
            oldest = min(oldest, span[0])  # the question is read (its own chunk, or inside the prompt): its proxies
        if oldest > first:
            # a copy, so that a view of the tail does not keep the whole chunk's queries alive
            q = q[:, :, oldest - first :].clone()
            first = oldest
        self.queries = q
        self.queries_first = first

    def compress(self, call: AttentionCall) -> None:
        m: NACL = self.method
        n = call.seen
        queries, first = self.queries, self.queries_first
        self.queries = None  # one shot: free the buffer whatever happens next
        span = call.question_span if m.proxy_source == "question" else None
        if span is not None and span[1] == n:
            source, proxy_start = "question", span[0]
        else:
            source, proxy_start = "last", n - max(1, int(m.proxy_ratio * n))
        n_proxy = n - proxy_start
        k = resolve_budget(m.budget, n)
        self._stats = {"prompt_tokens": n, "budget_tokens": min(k, n), "proxy_source": source, "proxy_tokens": n_proxy}
        if k >= n or n <= m.min_eviction_seqlen:
            self._record_counts(None, n)
            return
        if self.store.length != n:
            raise RuntimeError(f"NACL expects the whole prompt stored at compression ({self.store.length} != {n})")
        sink, recent, n_top, n_random = m.split(n, n_proxy)
        scaling = call.scaling if call.scaling is not None else self.info.head_dim**-0.5
        if queries is None or proxy_start < first:
            raise RuntimeError(f"NACL: proxy queries from position {proxy_start} were not buffered (from {first})")
        proxies = queries[:, :, proxy_start - first :]
        scores = proxy_scores(
            proxies, self.store.keys, scaling, proxy_start, m.gqa, m.score_block, self.store.positions
        )
        gen = layer_generator(m.seed, self.info.layer_idx)
        selection = select_kept(scores, sink, recent, n_top, n_random, gen)
        self.store.keep(selection.kept)
        self._record_counts(selection, n, sink, recent)

    def _record_counts(self, sel: Selection | None, n: int, sink: int = 0, recent: int = 0) -> None:
        """Measured per KV head (batch row 0; every row keeps the same counts) from the index tensors."""
        h = self.info.n_kv_heads
        if sel is None:
            self._stats.update(evicted=False, kept_per_head=[n] * h)
            return
        kept = sel.kept[0]
        distinct = (kept.diff(dim=-1) > 0).sum(dim=-1) + 1
        self._stats.update(
            evicted=True,
            kept_per_head=distinct.tolist(),
            kept_sink=(kept < sink).sum(dim=-1).tolist(),
            kept_recent=(kept >= n - recent).sum(dim=-1).tolist(),
            kept_proxy_top=[sel.top.shape[-1]] * h,
            kept_random=[sel.random.shape[-1]] * h,
        )

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)


# ------------------------------------------------------------------------------------------------ method
def _check_part(name: str, value: Any) -> None:
    """A part of the budget given in tokens: None (a share of the budget, ``shares``) or an int >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be None or an int (tokens), got {value!r}; give fractions of the budget as "
            "shares=(protect, proxy_keep, random_keep)"
        )
    check_int(name, value, 0)


def _check_shares(shares: Any) -> None:
    if not (
        isinstance(shares, tuple | list)
        and len(shares) == len(PARTS)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in shares)
        and sum(shares) > 0
    ):
        raise ValueError(
            f"shares must be three numbers >= 0 with a positive sum (protect, proxy_keep, random_keep: proportions "
            f"of the budget), got {shares!r}"
        )


def share_out(total: int, weights: list[float]) -> list[int]:
    """``total`` tokens in proportion to ``weights``: each but the last part rounds, the last takes the rest (never
    below zero); all weights zero: the last takes everything."""
    weight = sum(weights)
    out: list[int] = []
    for w in weights[:-1]:
        out.append(min(round(total * w / weight), total - sum(out)) if weight else 0)
    return [*out, total - sum(out)]


@register
@dataclass
class NACL(BudgetedMethod):
    """Proxy-token top-k + softmax-sampled random tokens + sink/recent, per KV head, once after prefill.

    ``budget`` (int tokens or float fraction of the prompt) = sink + recent + C_p + C_r entries per layer and KV
    head, exactly, on every prompt (``min(budget, n)``). ``protect`` (sink + recent), ``proxy_keep`` (C_p) and
    ``random_keep`` (C_r) given as ints are honoured exactly; the parts left at None share what they leave of the
    budget in the proportions ``shares`` (default 5 : 60 : 35, the released code's 1% : 12% : 7%), each rounded
    and the last of them taking the rest. When all three are given they must add up to the budget.
    """

    name = "nacl"
    summary = "Proxy-token attention top-k + softmax-sampled random tokens, per KV head, once after prefill"
    paper = "arXiv 2408.03675 (ACL 2024)"
    policy = NACLPolicy
    budget_counts = "entries stored per layer and KV head after the prompt; later tokens are added"
    shares_prefill = True

    budget: int | float = param(0.2, BUDGET_HELP + " (sink + recent + C_p + C_r)")
    n_sink: int = param(4, "first tokens kept, taken from protect (at most half of it)")
    shares: tuple[float, float, float] = param(
        DEFAULT_SHARES, "protect : C_p : C_r, proportions of the budget for the parts not given in tokens"
    )
    protect: int | None = param(None, "sink + recent, in tokens (None: its share of the budget)")
    proxy_keep: int | None = param(None, "C_p: top proxy-score tokens kept, in tokens (None: its share)")
    random_keep: int | None = param(None, "C_r: tokens sampled with probability softmax(scores) (None: the rest)")
    proxy_ratio: float = param(0.01, "proxy_source=last: the prompt's last fraction whose queries score the rest")
    proxy_source: str = param("question", "proxy queries: the question's tokens (paper) or the prompt's last ones")
    keep_proxies: bool = param(True, "grow the recent window over the proxy tokens, as far as the budget allows")
    gqa: str = param("sum", "sum: a KV head sums its query heads' scores; code: the released indexing")
    seed: int = param(0, "seed of the random sample (per layer)")
    min_eviction_seqlen: int = param(0, "prompts this short or shorter are not compressed (released code: 2048)")
    score_block: int = param(512, "keys scored at a time (memory, not results)")

    @property
    def compress_after_question(self) -> bool:  # type: ignore[override]
        """With a separate question and ``proxy_source="question"``, the question's tokens are the proxies."""
        return self.proxy_source == "question"

    def validate(self) -> None:
        super().validate()
        check_int("n_sink", self.n_sink, 0)
        _check_shares(self.shares)
        for name in PARTS:
            _check_part(name, getattr(self, name))
        check_float("proxy_ratio", self.proxy_ratio, 0.0, 1.0, low_open=True)
        check_choice("proxy_source", self.proxy_source, ("question", "last"))
        if not isinstance(self.keep_proxies, bool):
            raise TypeError(f"keep_proxies must be a bool, got {self.keep_proxies!r}")
        check_choice("gqa", self.gqa, ("sum", "code"))
        check_int("seed", self.seed, 0)
        check_int("min_eviction_seqlen", self.min_eviction_seqlen, 0)
        check_int("score_block", self.score_block, 1)
        if isinstance(self.budget, int):  # token parts against a token budget: checkable before any prompt
            self._check_given(self.budget, "")

    def _given(self) -> dict[str, int]:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def _check_given(self, k: int, prompt: str) -> None:
        """The parts given in tokens fit ``k`` (and fill it exactly when all three are given)."""
        given = self._given()
        total = sum(given.values())
        names = " + ".join(f"{p} ({v})" for p, v in given.items())
        if total > k:
            raise ValueError(f"{names} = {total} tokens exceed budget = {k} tokens{prompt}")
        if len(given) == len(PARTS) and total != k:
            raise ValueError(
                f"{names} = {total} tokens must equal budget = {k} tokens{prompt} when all three parts are given "
                "(leave random_keep=None to give it the rest of the budget)"
            )

    def split(self, n: int, n_proxy: int = 0) -> tuple[int, int, int, int]:
        """Tokens per head ``(sink, recent, C_p, C_r)`` for a prompt of ``n`` tokens with ``n_proxy`` proxies; they
        add up to ``min(budget, n)`` exactly.

        The sink takes at most half of ``protect`` (the released code's 256 sink tokens would otherwise exceed its
        1% protected part below 25.6K tokens). With ``keep_proxies`` the recent window grows over the proxies (the
        latest first), the room coming from C_r, then C_p -- only from parts not given in tokens, and never from a
        given ``protect`` -- so the total stays the same and as many proxies are kept as the budget allows.
        """
        k = min(resolve_budget(self.budget, n), n)
        self._check_given(k, f" for a {n}-token prompt")
        parts = self._given()
        free = [p for p in PARTS if p not in parts]
        if free:
            weights = [self.shares[PARTS.index(p)] for p in free]
            parts.update(zip(free, share_out(k - sum(parts.values()), weights)))
        protect, n_top, n_random = parts["protect"], parts["proxy_keep"], parts["random_keep"]
        sink = min(self.n_sink, protect // 2)
        recent = protect - sink
        if self.keep_proxies and n_proxy > recent and self.protect is None:
            from_random = n_random if self.random_keep is None else 0
            from_top = n_top if self.proxy_keep is None else 0
            extra = min(n_proxy - recent, from_random + from_top)
            recent += extra
            taken = min(extra, from_random)
            n_random -= taken
            n_top -= extra - taken
        return sink, recent, n_top, n_random


# Presets give their parts as shares of the budget (`shares`), so that another budget scales them: at its own budget
# each keeps its table's percentages of the prompt (exactly where those add up to the rounded budget).
register_preset(
    "nacl-code",
    NACL,
    "NACL with the released code's split: protect : C_p : C_r = 1 : 12 : 7 (256 sink), proxies = last 1%",
    budget=0.2,
    n_sink=256,
    shares=(0.01, 0.12, 0.07),
    proxy_ratio=0.01,
    proxy_source="last",
    keep_proxies=False,
)
register_preset(
    "nacl-last",
    NACL,
    "NACL with the prompt's last 1% as proxies (query-agnostic when the question comes after compression)",
    proxy_source="last",
)
# The paper's Table 4 (LLaMA-2-7B, 4K inputs), fractions of the prompt: budget % -> (Protect Proxy, No-protect Proxy,
# C_p, C_r). "Protect Proxy" is the protected recent part and Protect + No-protect the proxy span [ASSUMPTION, spec
# §4.4]; the table has no separate sink. Protect, C_p and C_r become shares of the budget; the proxy span stays a
# fraction of the prompt (the proxies score, they are not kept).
PAPER_TABLE4 = {10: (0.01, 0.03, 0.02, 0.07), 20: (0.02, 0.18, 0.06, 0.12), 30: (0.015, 0.20, 0.105, 0.18)}
for _pct, (_protect, _noprotect, _cp, _cr) in PAPER_TABLE4.items():
    register_preset(
        f"nacl-paper-{_pct}",
        NACL,
        f"NACL with the paper's Table 4 split at {_pct}%: protect {_protect:.1%}, C_p {_cp:.1%}, C_r {_cr:.0%} of "
        "the prompt, as shares of the budget",
        budget=_pct / 100,
        n_sink=0,
        shares=(_protect, _cp, _cr),
        proxy_ratio=round(_protect + _noprotect, 6),
        keep_proxies=False,
    )
