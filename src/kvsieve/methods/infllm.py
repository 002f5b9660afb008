"""InfLLM: a sliding window plus a block-level context memory that each window retrieves from.

Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory",
NeurIPS 2024 (arXiv 2402.04617; code thunlp/InfLLM). Spec: ``spec/methods.md`` section 1.

Per layer, the tokens seen so far are split into the first ``n_init`` tokens (attention sinks), the last
``n_local`` tokens (the local window) and everything in between, cut into blocks of ``block_size`` tokens that
live in host memory. Every window of ``exc_block_size`` prompt tokens (and every decode step, and the last prompt
token on its own, as the released drivers feed it) scores the blocks against the mean of its queries and attends,
with one softmax, to::

    local window (true relative positions) ; init tokens ; top-k blocks ; the not-yet-blocked remainder

The memory part sits at one fixed distance: its keys are pre-RoPE and every query is rotated by the single angle
of position ``n_local - 1``, so no query ever sees a relative distance beyond ``n_local`` and prompts far beyond
the model's trained window work. A block is represented by the mean of the pre-RoPE keys of its ``repr_topk``
tokens that received the most local attention (per query head, GQA-expanded, concatenated over heads); one block
set per layer is shared by all heads. Offloaded (the default on an accelerator), blocks live in host memory and
are copied on demand into a bounded device cache (LRU); on a CPU the store is read directly (``offload``).

Positions: the model hands over keys and queries rotated at their true positions. RoPE scores depend only on the
difference of positions, so attending the local window with them equals InfLLM's window-relative positions (up to
float rounding) and needs no re-rotation; the memory part is built from ``Rotary.unrotate`` (exact pre-RoPE
vectors) and ``Rotary.rotate`` at ``n_local - 1``.

Deviations from the released code (details in ``docs/methods/infllm_actqkv.md``):

* the remainder's mask uses the true query-key distance (``>= n_local``); the code's offset counts up to
  ``exc_block_size - 1`` tokens of the window boundary twice (locally and in memory) when a model-level chunk
  holds several windows;
* representative scores accumulate in float32 (the code: the model's dtype);
* one attention record per window (``call.record`` is called once per window, so a chunk of several windows
  records several times).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvsieve.methods.base import (
    AttentionCall,
    LayerInfo,
    LayerPolicy,
    Method,
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
from kvsieve.methods.infllm_budget import MIN_BUDGET, derive_cache_blocks, derive_structure
from kvsieve.ops.block_store import entry_bytes
from kvsieve.ops.blocks import BlockMemory, TokenBuffer
from kvsieve.ops.grouped import cast, dot_scores
from kvsieve.ops.merged import Band, Part, merged_attention
from kvsieve.ops.rope import shared_rotary
from kvsieve.ops.scoring import top_indices


def ends_prompt(call: AttentionCall) -> bool:
    """A multi-token call that completes the prompt as far as the cache knows: the chunk that completes the prompt
    (``PREFILL_LAST``) or a question chunk fed after it. Its last token gets a retrieval of its own, as in the
    released drivers, which prefill ``input_ids[:-1]`` and then feed the last prompt token alone."""
    return call.n_new > 1 and call.phase is not Phase.PREFILL


def window_bounds(n: int, size: int, split_last: bool = False) -> list[tuple[int, int]]:
    """``[start, stop)`` of the windows of ``size`` queries that a call of ``n`` queries is cut into; with
    ``split_last`` the last query is a window of its own (the rest is cut from the start as usual)."""
    head = n - 1 if split_last and n > 1 else n
    bounds = [(start, min(head, start + size)) for start in range(0, head, size)]
    return [*bounds, (head, n)] if head < n else bounds


class InfLLMPolicy(LayerPolicy):
    """One layer's window, init tokens and block memory; attention per window of ``exc_block_size`` queries."""

    def __init__(self, method: InfLLM, info: LayerInfo, reserve: int = 64) -> None:
        super().__init__(method, info, reserve)
        if info.config is None:
            raise ValueError(f"{method.name} needs the model's config (its RoPE parameters)")
        layer_types = getattr(info.config, "layer_types", None)
        self.rotary = shared_rotary(info, layer_types[info.layer_idx] if layer_types else None)
        self.topk = method.blocks_per_step
        # strict_budget: a one-query window (a decode step) attends at most the budget: see `hold_budget`
        self.capped = method.strict_budget
        self.recent = TokenBuffer(info.n_heads, spare=max(reserve, 2 * method.block_size))
        self.memory: BlockMemory | None = None
        self.init_k: torch.Tensor | None = None  # [B, H_kv, n_init, D] pre-RoPE (scaled like memory keys)
        self.init_v: torch.Tensor | None = None
        self.init_len = 0
        self.init_entry_bytes = 0  # K and V bytes of one init token (all rows and heads)
        self.init: tuple[torch.Tensor, torch.Tensor] | None = None  # views of the init tokens filled so far
        self.init_first = 0  # position of the first init token
        self.init_closed = False
        # measured, for statistics
        self.blocks_prefill: list[int] = []
        self.blocks_decode: list[int] = []
        self.attended_max = 0
        self.device_bytes_peak = 0

    # ------------------------------------------------------------------------------------------- storage
    def update(
        self, key: torch.Tensor, value: torch.Tensor, first_position: int, phase: Phase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is None:
            m = self.method
            offload = key.device.type != "cpu" if m.offload is None else m.offload
            self.memory = BlockMemory(
                m.block_size, m.cache_blocks, key.device, m.cache_strategy, m.score_decay, offload=offload
            )
            b, h_kv, _, d = key.shape
            self.init_k = key.new_empty(b, h_kv, m.n_init, d)
            self.init_v = value.new_empty(b, h_kv, m.n_init, value.shape[-1])
            self.init_entry_bytes = entry_bytes(self.init_k, 2) + entry_bytes(self.init_v, 2)
            self.init = (self.init_k[:, :, :0], self.init_v[:, :, :0])
        self.recent.append(key, value, first_position)
        return key, value  # the attention function is ours: it reads the policy's state, not these

    def memory_keys(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Post-RoPE keys ``[B, H_kv, n, D]`` at ``first_position ..`` -> the memory's pre-RoPE keys. Scaled by the
        RoPE attention scaling (1 unless YaRN-like), so memory logits get the same factor as local ones."""
        pre = self.rotary.unrotate(keys, range(first_position, first_position + keys.shape[2]))
        scale = self.rotary.attention_scaling
        return pre if scale == 1.0 else pre * scale

    # ----------------------------------------------------------------------------------------- attention
    def attend(self, call: AttentionCall) -> torch.Tensor:
        query = call.query  # [B, H, c, D] post-RoPE at first_position ..
        c = query.shape[2]
        # Memory queries: pre-RoPE, rotated by the single angle of position n_local - 1 (one rotation: composed).
        q_mem = self.rotary.move(query, range(call.first_position, call.first_position + c), self.method.n_local - 1)
        self.on_chunk(call, q_mem)
        windows = [(0, 1)] if c == 1 else window_bounds(c, self.method.exc_block_size, split_last=ends_prompt(call))
        self.begin_call(call, len(windows))
        scaling = call.scaling if call.scaling is not None else query.shape[-1] ** -0.5
        outs = []
        for w, (start, stop) in enumerate(windows):
            if self.capped and stop - start == 1:
                self.hold_budget(call.first_position + stop)
            q_loc, q_win = (query, q_mem) if stop - start == c else (query[:, :, start:stop], q_mem[:, :, start:stop])
            outs.append(self.attend_window(call, q_loc, q_win, call.first_position + start, scaling, w))
        self.recent.shrink()
        self.device_bytes_peak = max(self.device_bytes_peak, self.kv_bytes())
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous()

    def attend_window(
        self, call: AttentionCall, q_loc: torch.Tensor, q_mem: torch.Tensor, first: int, scaling: float, window: int
    ) -> torch.Tensor:
        """One window: queries at ``first .. first + w - 1``; returns ``[B, H, w, D]``.

        One softmax over three parts, each attended where it lies and merged exactly (`merged_attention`): the
        local window (the model's positions), the near memory (init tokens ; the remainder that has left some
        query's window) and the retrieved blocks (both at the memory's fixed distance). A one-query window (a
        decode step) sees all of the memory, so its near memory is laid out around the blocks in the attended
        buffer (`AttendedBuffer.gather`) and attended with them: two parts, one matmul pair fewer per layer."""
        m = self.method
        n_local, recent = m.n_local, self.recent
        b, _, w, _ = q_loc.shape
        end = first + w  # exclusive
        rs = recent.first_position
        device = q_loc.device

        # local window: the n_local tokens ending at each query, with the model's own (relative) positions
        lo = max(first - n_local + 1, rs)
        # query i sees the keys t (from lo) with 0 <= first + i - (lo + t) < n_local; one query sees all of them
        loc_band = Band(first - lo - n_local + 1, first - lo + 1) if w > 1 else None
        local = Part(q_loc, *recent.span(lo - rs, end - rs), loc_band)

        # retrieved blocks; lru-s credits each block with the attention mass it received
        selection = self.select_blocks(call, q_mem, window)
        n_sel = 0 if selection is None else selection.shape[1]
        (self.blocks_decode if call.phase is Phase.DECODE else self.blocks_prefill).append(n_sel)

        # near memory: init tokens (seen by all) ; the remainder, seen by the queries it is n_local or more behind
        n_rem = max(0, end - n_local - rs)
        init = self.init
        order: list[list[int]] = []
        blocks_from = 0  # where the blocks' keys start in the memory part that holds them
        if n_sel and w == 1:  # one query sees every memory entry: init ; blocks ; remainder as one run, two parts
            tail = None
            if n_rem:  # the remainder grows a token a step: its memory keys are derived, and laid out after the
                # blocks, a block of tokens ahead (the attended buffer then writes nothing at most steps)
                tail = recent.derived_span(recent.derive_keys(n_rem, self.memory_keys, m.block_size))
            head = init if self.init_len else None
            mem_k, mem_v, order = self.memory.fetch(selection, head, tail, rs, tail_len=n_rem)
            scored, fused, blocks_from = [local], [Part(q_mem, mem_k, mem_v)], self.init_len
        else:
            remainder = None
            if n_rem:  # a decode step without blocks derives its keys a block of tokens ahead too
                keys = recent.derived_keys(n_rem, self.memory_keys, m.block_size if w == 1 else 0)
                remainder = (keys, recent.value_span(0, n_rem))
            near_k, near_v = init
            near_band = None
            if remainder is not None:
                near_k = torch.cat([near_k, remainder[0]], dim=2)
                near_v = torch.cat([near_v, remainder[1]], dim=2)
                if w > 1:  # remainder token r: seen iff first + i - (rs + r) >= n_local; one query sees all
                    near_band = Band(hi=self.init_len + first - rs - n_local + 1, floor=self.init_len)
            scored = [local] if not near_k.shape[2] else [local, Part(q_mem, near_k, near_v, near_band)]
            fused = []
            if n_sel:
                blk_k, blk_v, order = self.memory.fetch(selection)
                fused.append(Part(q_mem, blk_k, blk_v))
        credit = bool(n_sel) and m.cache_strategy == "lru-s"

        out, received = merged_attention(scored, fused, scaling, fused_sums=credit)

        # bookkeeping: local attention received (block representatives), cache scores, what was attended
        recent.score_span(lo - rs, end - rs).add_(received[0])  # in place: no write-back through the slice
        if credit:
            blocks = received[-1][..., blocks_from : blocks_from + n_sel * m.block_size]
            mass = blocks.sum(dim=1).view(b, n_sel, m.block_size).sum(-1)
            self.memory.credit(order, mass)  # the mass is in the keys' order
        first_recent = rs if n_rem else lo

        def attended() -> torch.Tensor:  # built only when the cache traces
            init_pos = torch.arange(self.init_first, self.init_first + self.init_len, device=device)
            blk_pos = self.memory.positions(order) if n_sel else torch.empty(b, 0, dtype=torch.long, device=device)
            recent_pos = torch.arange(first_recent, end, device=device)
            flat = torch.cat([init_pos[None].expand(b, -1), blk_pos, recent_pos[None].expand(b, -1)], dim=1)
            return flat[:, None, :].expand(b, self.info.n_kv_heads, -1)

        count = self.init_len + n_sel * m.block_size + end - first_recent
        self.attended_max = max(self.attended_max, count)
        call.record(attended, count)
        self.after_window(call, end)
        self.advance(end)
        return out

    # ---------------------------------------------------------------------------------------- retrieval
    def select_blocks(self, call: AttentionCall, q_mem: torch.Tensor, window: int) -> torch.Tensor | None:
        """Block indices ``[B, k]`` (in no particular order: `AttendedBuffer.gather` places them) this window
        attends, or None. InfLLM: all blocks while there are at most ``topk``, else the top-k by ``<mean of the
        window's memory queries, repr_B>``."""
        n = 0 if self.memory is None else self.memory.n_blocks
        if n == 0 or self.topk == 0:
            return None
        b = q_mem.shape[0]
        if n <= self.topk:
            return torch.arange(n, device=q_mem.device)[None].expand(b, n)
        mean = cast(q_mem, torch.float32) if q_mem.shape[2] == 1 else q_mem.float().mean(dim=2)  # 1: itself
        probe = mean.reshape(b, -1)  # [B, H * D]
        return top_indices(dot_scores(self.memory.reprs, probe), self.topk, ascending=False)

    # ------------------------------------------------------------------------------ moving to the memory
    def advance(self, end: int) -> None:
        """After the window ending at ``end`` (exclusive): fill the init tokens, then cut every block that has left
        the local window of all later queries (code: ``append_global``)."""
        self.fill_init(end)
        m, recent = self.method, self.recent
        while end - recent.first_position - m.block_size >= m.n_local:
            self.make_block()

    def hold_budget(self, end: int) -> None:
        """Before a one-query window ending at ``end`` (a decode step, the last prompt token's own lookup), with a
        budget: cut blocks until the recent tokens, the query included, fit the window (``n_local``).

        The released code also attends the partial block that has left the window but does not fill a block yet
        (1 to ``block_size`` tokens at decode: 2049-2080 entries at its 2K configuration). Cutting the block that
        holds them now, up to ``block_size - 1`` tokens before the released code would, keeps the step within
        ``n_init + n_local + topk x block_size <= budget``: the window then holds ``n_local - block_size + 1`` to
        ``n_local`` tokens, and the newly cut block is retrievable like any other."""
        self.fill_init(end)
        while end - self.recent.first_position > self.method.n_local:
            self.make_block()

    def fill_init(self, end: int) -> None:
        """Move the first tokens that have left the window of the query at ``end - 1`` to the init tokens, until
        there are ``n_init``."""
        m, recent = self.method, self.recent
        if not self.init_closed and end - recent.first_position > m.n_local:
            take = min(m.n_init - self.init_len, end - recent.first_position - m.n_local)
            if self.init_len == 0:
                self.init_first = recent.first_position
            if take > 0:
                self.on_leave(recent.first_position, recent.scores[:, :, :take])
                keys = recent.derived_keys(take, self.memory_keys)
                self.init_k[:, :, self.init_len : self.init_len + take] = keys
                self.init_v[:, :, self.init_len : self.init_len + take] = recent.values[:, :, :take]
                self.init_len += take
                self.init = (self.init_k[:, :, : self.init_len], self.init_v[:, :, : self.init_len])
                recent.drop_front(take)
            self.init_closed = self.init_len == m.n_init

    def make_block(self) -> None:
        """Move the first ``block_size`` recent tokens into a block with its representative vector."""
        m, recent, info = self.method, self.recent, self.info
        bs, first = m.block_size, self.recent.first_position
        keys = recent.derived_keys(bs, self.memory_keys)  # [B, H_kv, bs, D]: computed once per token
        scores = recent.scores[:, :, :bs]  # [B, H, bs]
        self.on_leave(first, scores)
        chosen = scores.topk(m.repr_topk, dim=-1).indices  # [B, H, r]
        per_head = keys.repeat_interleave(info.group_size, dim=1)  # [B, H, bs, D]
        d = keys.shape[-1]
        reps = per_head.gather(2, chosen[..., None].expand(-1, -1, -1, d)).float().mean(dim=2)  # [B, H, D]
        self.memory.add(keys, recent.values[:, :, :bs], reps.reshape(keys.shape[0], -1), first)
        recent.drop_front(bs)

    # ------------------------------------------------------------------------------- hooks for ActQKV
    def on_chunk(self, call: AttentionCall, q_mem: torch.Tensor) -> None:
        """Every attention call, before its windows: the chunk's memory queries ``[B, H, c, D]``."""

    def begin_call(self, call: AttentionCall, n_windows: int) -> None:
        """Every attention call, before its ``n_windows`` windows."""

    def after_window(self, call: AttentionCall, end: int) -> None:
        """After a window's attention and scores, before tokens move to the memory."""

    def on_leave(self, first_position: int, scores: torch.Tensor) -> None:
        """Tokens ``first_position ..`` leave the recent buffer; ``scores`` ``[B, H, n]`` are their local scores."""

    # -------------------------------------------------------------------------------------- accounting
    def stored_length(self) -> int:
        """Device-resident entries per KV head: recent tokens, init tokens and cached blocks (fullest row)."""
        blocks = self.memory.resident_blocks() if self.memory is not None else 0
        return self.recent.length + self.init_len + blocks * self.method.block_size

    def kv_bytes(self) -> int:
        """Device-resident K/V bytes (window + remainder, init tokens, cached blocks), measured from the tensors.
        The host block store is reported separately (``host_bytes`` in `stats`)."""
        if self.memory is None:
            return 0
        return self.recent.used_bytes() + self.init_entry_bytes * self.init_len + self.memory.device_bytes()

    def allocated_bytes(self) -> int:
        total = self.recent.allocated_bytes()
        if self.init_k is not None:
            total += self.init_k.nbytes + self.init_v.nbytes
        if self.memory is not None:
            total += self.memory.allocated_bytes()
        return total

    def host_bytes(self) -> int:
        return 0 if self.memory is None else self.memory.host_bytes()

    def stats(self) -> dict[str, Any]:
        mem = self.memory
        out: dict[str, Any] = {
            "topk": self.topk,
            "device_bytes": self.kv_bytes(),
            "device_bytes_peak": self.device_bytes_peak,
            "host_bytes": self.host_bytes(),
            "repr_bytes": 0 if mem is None else mem.repr_bytes(),
            "host_blocks": 0 if mem is None else mem.n_blocks,
            "cached_blocks": 0 if mem is None or mem.cache is None else max(mem.cache.occupied(), default=0),
            "cache_loads": 0 if mem is None or mem.cache is None else mem.cache.loads,
            "buffer_copies": 0 if mem is None else mem.buffer.copies,
            "cache_hits": 0 if mem is None or mem.cache is None else mem.cache.hits,
            "attended_max": self.attended_max,
        }
        for name, values in (("prefill", self.blocks_prefill), ("decode", self.blocks_decode)):
            if values:
                out[f"retrieved_blocks_{name}_mean"] = sum(values) / len(values)
                out[f"retrieved_blocks_{name}_min"] = min(values)
                out[f"retrieved_blocks_{name}_max"] = max(values)
        return out


def structure_param(meaning: str, rule: str, released: Any) -> Any:
    """A structural parameter: unset (None) it is derived from the budget, or the released value without one."""
    return param(None, f"{meaning}; derived from budget when unset ({rule}); without a budget {released}")


@register
@dataclass
class InfLLM(Method):
    """Sliding window + init tokens + the top-``topk`` blocks of a host-resident context memory, per window.

    Without a budget, the repository configs (``config/{mistral,llama-3,qwen}-inf-llm.yaml``, `RELEASED`): 128 init
    tokens, a 4096-token window, 128-token blocks, 16 blocks per step (the paper's Llama-3 text says 32; the code:
    16), 4 representative tokens, windows of 512 queries, a cache of 32 blocks.

    With a ``budget`` (entries a decode step attends per layer; an int, or a fraction of the prompt that
    `for_prompt` resolves), every structural parameter left unset is derived from it (`infllm_budget`: at 2048,
    ActQKV's released 64 init + 512 window + 46 blocks x 32) and the ones set are kept or refused. As in the released
    code, a step also attends the partial block that has left the window (fewer than ``block_size`` entries) and
    its own token; with ``strict_budget`` every one-query step attends at most the budget instead
    (`InfLLMPolicy.hold_budget`, a deviation). ``given`` names the parameters the user set; after construction
    every field holds the value in use.
    """

    name = "infllm"
    summary = "Sliding window + init tokens + top-k retrieved blocks of a host-resident context memory"
    paper = "arXiv 2402.04617 (NeurIPS 2024)"
    policy = InfLLMPolicy
    budget_counts = (
        f"entries a decode step attends per layer: init + window + blocks, plus (as released) the block still "
        f"filling, fewer than block_size, unless strict_budget; the block memory is kept off the device; an int >= "
        f"{MIN_BUDGET}, or a fraction of the prompt resolved to at least {MIN_BUDGET}"
    )
    extrapolates: ClassVar[bool] = True  # memory at a fixed distance: prompts beyond the trained window work
    MIN_TOPK: ClassVar[int] = 0
    STRUCTURE: ClassVar[tuple[str, ...]] = (
        "n_init",
        "n_local",
        "block_size",
        "topk",
        "exc_block_size",
        "repr_topk",
        "max_cached_block",
    )
    # the structure without a budget; max_cached_block None: twice the blocks a step retrieves
    RELEASED: ClassVar[dict[str, int | None]] = dict(
        n_init=128, n_local=4096, block_size=128, topk=16, repr_topk=4, exc_block_size=512, max_cached_block=None
    )

    n_init: int | None = structure_param("first tokens always attended (attention sinks)", "budget // 32", 128)
    n_local: int | None = structure_param(
        "sliding window of recent tokens, attended at their true distance", "budget // 4 + the rounding", 4096
    )
    block_size: int | None = structure_param("tokens per memory block", "the largest power of two <= sqrt(budget)", 128)
    topk: int | None = structure_param("blocks retrieved per step", "the blocks that fill the budget", 16)
    budget: int | float | None = param(
        None,
        f"entries a decode step attends per layer: n_init + n_local + topk x block_size (+ the block still filling, "
        f"unless strict_budget); an int >= {MIN_BUDGET} or a fraction of the prompt; the structural parameters left "
        "unset are derived from it",
    )
    strict_budget: bool = param(
        False,
        "a decode step attends at most the budget: the window's oldest whole block moves to memory first (the "
        "released code attends the block still filling on top: up to block_size - 1 more entries)",
    )
    repr_topk: int | None = structure_param(
        "most-attended tokens whose keys represent a block", "min(4, block_size)", 4
    )
    exc_block_size: int | None = structure_param(
        "prompt queries per retrieval window", "the largest power of two <= n_local / 2, at most 512", 512
    )
    max_cached_block: int | None = structure_param(
        "blocks cached on the device", "the smallest power of two >= 2 x topk", "2 x topk"
    )
    offload: bool | None = param(
        None,
        "blocks that leave the window go to a host-memory store, with a device cache of max_cached_block blocks "
        "per layer (InfLLM's offload); False: the store stays on the model's device and a step's blocks are read "
        "from it directly (no cache); None: offload unless the model runs on the CPU (there the host memory is the "
        "device's, and a cache would only copy blocks within it). The same attention either way",
    )
    cache_strategy: str = param("lru", "device cache eviction: lru, or lru-s (lowest decayed score)")
    score_decay: float = param(0.1, "lru-s only: per-step decay of a cached block's score")

    def __post_init__(self) -> None:
        # what the user set, before validate() fills the rest in (derived from the budget, or released)
        self.given: frozenset[str] = frozenset(n for n in self.STRUCTURE if getattr(self, n) is not None)
        super().__post_init__()

    # ------------------------------------------------------------------------------------- validation
    def lowest(self) -> dict[str, int]:
        """The smallest value each structural parameter may take."""
        return dict(n_init=0, n_local=1, block_size=1, topk=self.MIN_TOPK, exc_block_size=1, repr_topk=1)

    def validate(self) -> None:
        check_choice("cache_strategy", self.cache_strategy, ("lru", "lru-s"))
        if self.offload is not None and not isinstance(self.offload, bool):
            raise TypeError(f"offload must be True, False or None, got {self.offload!r}")
        if not isinstance(self.strict_budget, bool):
            raise TypeError(f"strict_budget must be a bool, got {self.strict_budget!r}")
        if self.strict_budget and self.budget is None:
            raise ValueError("strict_budget=True needs a budget (the entries a decode step may attend)")
        check_float("score_decay", self.score_decay, 0.0, 1.0, low_open=True)
        given = {name: getattr(self, name) for name in self.STRUCTURE if name in self.given}
        lowest = self.lowest()
        for name, value in given.items():
            check_int(name, value, lowest.get(name, 1))
        budget = self.budget
        if isinstance(budget, float):
            check_budget(budget)  # a fraction of the prompt: the structure is derived by for_prompt
            self.check_structure({name: given.get(name) for name in self.STRUCTURE})
            return
        if budget is None:
            values = {name: given.get(name, self.RELEASED[name]) for name in self.STRUCTURE}
        elif isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_BUDGET:
            raise ValueError(
                f"budget must be an int >= {MIN_BUDGET} (entries a step attends) or a fraction of the prompt in "
                f"(0, 1], got {budget!r}"
            )
        else:
            values = self.derive(budget, given)
        for name, value in values.items():
            setattr(self, name, value)
        self.check_structure(values)

    def derive(self, budget: int, given: dict[str, int]) -> dict[str, int]:
        """Every structural parameter at ``budget``, keeping ``given`` (`infllm_budget`)."""
        values = derive_structure(budget, given)
        values["max_cached_block"] = given.get("max_cached_block", derive_cache_blocks(values["topk"], values["topk"]))
        return values

    def check_structure(self, values: dict[str, int | None]) -> None:
        """The constraints between parameters, for those known (None: derived once a fraction is resolved)."""
        bs, n_local, cache = values["block_size"], values["n_local"], values["max_cached_block"]
        if values["repr_topk"] is not None and bs is not None:
            check_int("repr_topk", values["repr_topk"], 1, bs)
        if values["exc_block_size"] is not None and n_local is not None:
            check_int("exc_block_size", values["exc_block_size"], 1, n_local)
        if cache is not None and not isinstance(self.budget, float):
            check_int("max_cached_block", cache, max(1, self.max_blocks_per_step))

    def for_prompt(self, prompt_tokens: int) -> InfLLM:
        """A fractional ``budget`` becomes ``round(budget x prompt_tokens)`` entries, at least `MIN_BUDGET`, and the
        structure is derived at it (keeping what the user set); parameters that do not fit it are refused here,
        before any token is read."""
        if not isinstance(self.budget, float):
            return self
        check_int("prompt_tokens", prompt_tokens, 1)
        entries = max(MIN_BUDGET, resolve_budget(self.budget, prompt_tokens))
        try:
            resolved = self.with_budget(entries)
        except ValueError as error:
            raise ValueError(
                f"budget={self.budget} of a {prompt_tokens}-token prompt is {entries} entries: {error}"
            ) from None
        object.__setattr__(resolved, "name", self.name)  # presets keep their name
        return resolved

    def with_budget(self, budget: int | float | None) -> InfLLM:
        """This method at another budget: the structural parameters the user set kept, the others derived anew."""
        kept = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.STRUCTURE or f.name in self.given
        }
        return type(self)(**{**kept, "budget": budget})

    # -------------------------------------------------------------------------------------- structure
    @property
    def blocks_per_step(self) -> int:
        """``topk``: set, derived from the budget, or released."""
        if self.topk is None:
            raise ValueError(
                f"{self.name}: budget={self.budget} is a fraction of the prompt; resolve it with "
                "method.for_prompt(prompt_tokens) before building a cache (kvsieve.generate does)"
            )
        return self.topk

    @property
    def max_blocks_per_step(self) -> int:
        return self.blocks_per_step

    @property
    def cache_blocks(self) -> int:
        """Blocks the device cache holds per layer and batch row."""
        if self.max_cached_block is not None:
            return self.max_cached_block
        return max(1, 2 * self.max_blocks_per_step)

    @property
    def budget_label(self) -> int | float:
        if self.budget is not None:
            return self.budget
        return self.n_init + self.n_local + self.blocks_per_step * self.block_size


register_preset(
    "infllm-2k", InfLLM, "InfLLM at 2K attended entries, derived: 64 init + 512 window + 46 blocks x 32", budget=2048
)
