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
set per layer is shared by all heads. Blocks are copied on demand into a bounded device cache (LRU).

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
from kvsieve.ops.blocks import BlockMemory, TokenBuffer
from kvsieve.ops.grouped import dot_scores, two_part_attention
from kvsieve.ops.rope import Rotary
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
        self.rotary = Rotary(info.config, layer_types[info.layer_idx] if layer_types else None)
        self.topk = method.blocks_per_step
        self.recent = TokenBuffer(info.n_heads, spare=max(reserve, 2 * method.block_size))
        self.memory: BlockMemory | None = None
        self.init_k: torch.Tensor | None = None  # [B, H_kv, n_init, D] pre-RoPE (scaled like memory keys)
        self.init_v: torch.Tensor | None = None
        self.init_len = 0
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
            self.memory = BlockMemory(m.block_size, m.cache_blocks, key.device, m.cache_strategy, m.score_decay)
            b, h_kv, _, d = key.shape
            self.init_k = key.new_empty(b, h_kv, m.n_init, d)
            self.init_v = value.new_empty(b, h_kv, m.n_init, value.shape[-1])
        self.recent.append(key, value, first_position)
        return key, value  # the attention function is ours: it reads the policy's state, not these

    def memory_keys(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Post-RoPE keys ``[B, H_kv, n, D]`` at ``first_position ..`` -> the memory's pre-RoPE keys. Scaled by the
        RoPE attention scaling (1 unless YaRN-like), so memory logits get the same factor as local ones."""
        positions = torch.arange(first_position, first_position + keys.shape[2], device=keys.device)
        pre = self.rotary.unrotate(keys, positions)
        scale = self.rotary.attention_scaling
        return pre if scale == 1.0 else pre * scale

    # ----------------------------------------------------------------------------------------- attention
    def attend(self, call: AttentionCall) -> torch.Tensor:
        query = call.query  # [B, H, c, D] post-RoPE at first_position ..
        c = query.shape[2]
        positions = torch.arange(call.first_position, call.first_position + c, device=query.device)
        # Memory queries: pre-RoPE, rotated by the single angle of position n_local - 1.
        pre = self.rotary.unrotate(query, positions)
        q_mem = self.rotary.rotate(pre, torch.tensor(self.method.n_local - 1, device=query.device))
        self.on_chunk(call, q_mem)
        windows = window_bounds(c, self.method.exc_block_size, split_last=ends_prompt(call))
        self.begin_call(call, len(windows))
        scaling = call.scaling if call.scaling is not None else query.shape[-1] ** -0.5
        outs = []
        for w, (start, stop) in enumerate(windows):
            outs.append(
                self.attend_window(
                    call, query[:, :, start:stop], q_mem[:, :, start:stop], call.first_position + start, scaling, w
                )
            )
        self.recent.shrink()
        self.device_bytes_peak = max(self.device_bytes_peak, self.kv_bytes())
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous()

    def attend_window(
        self, call: AttentionCall, q_loc: torch.Tensor, q_mem: torch.Tensor, first: int, scaling: float, window: int
    ) -> torch.Tensor:
        """One window: queries at ``first .. first + w - 1``; returns ``[B, H, w, D]``."""
        m = self.method
        n_local, recent = m.n_local, self.recent
        w = q_loc.shape[2]
        end = first + w  # exclusive
        rs = recent.first_position
        device = q_loc.device
        qpos = torch.arange(first, end, device=device)

        # local window: the n_local tokens ending at each query, with the model's own (relative) positions
        lo = max(first - n_local + 1, rs)
        k_loc = recent.keys[:, :, lo - rs : end - rs]
        v_loc = recent.values[:, :, lo - rs : end - rs]
        dist = qpos[:, None] - torch.arange(lo, end, device=device)[None, :]
        loc_mask = (dist >= 0) & (dist < n_local)

        # memory: retrieved blocks ; init tokens ; the remainder that has left some query's window
        selection = self.select_blocks(call, q_mem, window)
        n_sel = 0 if selection is None else selection.shape[1]
        (self.blocks_decode if call.phase is Phase.DECODE else self.blocks_prefill).append(n_sel)
        b = q_loc.shape[0]
        if n_sel:
            blk_k, blk_v, blk_pos = self.memory.fetch(selection)
        else:
            blk_k, blk_v = k_loc[:, :, :0], v_loc[:, :, :0]
            blk_pos = torch.empty(b, 0, dtype=torch.long, device=device)
        n_rem = max(0, end - n_local - rs)
        rem_k = self.memory_keys(recent.keys[:, :, :n_rem], rs)
        rem_v = recent.values[:, :, :n_rem]
        k_mem = torch.cat([blk_k, self.init_k[:, :, : self.init_len], rem_k], dim=2)
        v_mem = torch.cat([blk_v, self.init_v[:, :, : self.init_len], rem_v], dim=2)
        rem_dist = qpos[:, None] - torch.arange(rs, rs + n_rem, device=device)[None, :]

        out, p_loc_sum, p_mem_sum = two_part_attention(
            q_loc, k_loc, v_loc, loc_mask, q_mem, k_mem, v_mem, rem_dist >= n_local, scaling
        )

        # bookkeeping: local attention received (block representatives), cache scores, what was attended
        recent.scores[:, :, lo - rs : end - rs] += p_loc_sum
        if n_sel and m.cache_strategy == "lru-s":
            mass = p_mem_sum[..., : n_sel * m.block_size].sum(dim=1).view(b, n_sel, m.block_size).sum(-1)
            self.memory.cache.credit(selection.tolist(), mass)
        first_recent = rs if n_rem else lo
        init_pos = torch.arange(self.init_first, self.init_first + self.init_len, device=device)
        attended = torch.cat(
            [init_pos[None].expand(b, -1), blk_pos, torch.arange(first_recent, end, device=device)[None].expand(b, -1)],
            dim=1,
        )
        self.attended_max = max(self.attended_max, attended.shape[1])
        call.record(attended[:, None, :].expand(b, self.info.n_kv_heads, -1))
        self.after_window(call, end)
        self.advance(end)
        return out

    # ---------------------------------------------------------------------------------------- retrieval
    def select_blocks(self, call: AttentionCall, q_mem: torch.Tensor, window: int) -> torch.Tensor | None:
        """Block indices ``[B, k]`` (ascending) this window attends, or None. InfLLM: all blocks while there are at
        most ``topk``, else the top-k by ``<mean of the window's memory queries, repr_B>``."""
        n = 0 if self.memory is None else self.memory.n_blocks
        if n == 0 or self.topk == 0:
            return None
        b = q_mem.shape[0]
        if n <= self.topk:
            return torch.arange(n, device=q_mem.device)[None].expand(b, n)
        probe = q_mem.float().mean(dim=2).reshape(b, -1)  # [B, H * D]
        return top_indices(dot_scores(self.memory.reprs, probe), self.topk)

    # ------------------------------------------------------------------------------ moving to the memory
    def advance(self, end: int) -> None:
        """After the window ending at ``end`` (exclusive): fill the init tokens, then cut every block that has left
        the local window of all later queries (code: ``append_global``)."""
        m, recent = self.method, self.recent
        if not self.init_closed and end - recent.first_position > m.n_local:
            take = min(m.n_init - self.init_len, end - recent.first_position - m.n_local)
            if self.init_len == 0:
                self.init_first = recent.first_position
            if take > 0:
                self.on_leave(recent.first_position, recent.scores[:, :, :take])
                keys = self.memory_keys(recent.keys[:, :, :take], recent.first_position)
                self.init_k[:, :, self.init_len : self.init_len + take] = keys
                self.init_v[:, :, self.init_len : self.init_len + take] = recent.values[:, :, :take]
                self.init_len += take
                recent.drop_front(take)
            self.init_closed = self.init_len == m.n_init
        bs = m.block_size
        while end - recent.first_position - bs >= m.n_local:
            self.make_block()

    def make_block(self) -> None:
        """Move the first ``block_size`` recent tokens into a block with its representative vector."""
        m, recent, info = self.method, self.recent, self.info
        bs, first = m.block_size, self.recent.first_position
        keys = self.memory_keys(recent.keys[:, :, :bs], first)  # [B, H_kv, bs, D]
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
        cached = max(self.memory.cache.occupied(), default=0) if self.memory is not None else 0
        return self.recent.length + self.init_len + cached * self.method.block_size

    def kv_bytes(self) -> int:
        """Device-resident K/V bytes (window + remainder, init tokens, cached blocks), measured from the tensors.
        The host block store is reported separately (``host_bytes`` in `stats`)."""
        total = self.recent.used_bytes()
        if self.init_k is not None:
            total += 2 * self.init_k[:, :, : self.init_len].numel() * self.init_k.element_size()
        if self.memory is not None:
            total += self.memory.cache.used_bytes()
        return total

    def allocated_bytes(self) -> int:
        total = self.recent.allocated_bytes()
        if self.init_k is not None:
            total += self.init_k.nbytes + self.init_v.nbytes
        if self.memory is not None:
            total += self.memory.cache.allocated_bytes()
        return total

    def host_bytes(self) -> int:
        return 0 if self.memory is None else self.memory.host.used_bytes()

    def stats(self) -> dict[str, Any]:
        mem = self.memory
        out: dict[str, Any] = {
            "topk": self.topk,
            "device_bytes": self.kv_bytes(),
            "device_bytes_peak": self.device_bytes_peak,
            "host_bytes": self.host_bytes(),
            "repr_bytes": 0 if mem is None else mem.repr_bytes(),
            "host_blocks": 0 if mem is None else mem.n_blocks,
            "cached_blocks": 0 if mem is None else max(mem.cache.occupied(), default=0),
            "cache_loads": 0 if mem is None else mem.cache.loads,
            "cache_hits": 0 if mem is None else mem.cache.hits,
            "attended_max": self.attended_max,
        }
        for name, values in (("prefill", self.blocks_prefill), ("decode", self.blocks_decode)):
            if values:
                out[f"retrieved_blocks_{name}_mean"] = sum(values) / len(values)
                out[f"retrieved_blocks_{name}_min"] = min(values)
                out[f"retrieved_blocks_{name}_max"] = max(values)
        return out

    def select_batch(self, batch_indices: torch.Tensor) -> None:
        self.recent.select_batch(batch_indices)
        if self.init_k is not None:
            self.init_k = self.init_k.index_select(0, batch_indices.to(self.init_k.device))
            self.init_v = self.init_v.index_select(0, batch_indices.to(self.init_v.device))
        if self.memory is not None:
            self.memory.select_batch(batch_indices)


@register
@dataclass
class InfLLM(Method):
    """Sliding window + init tokens + the top-``topk`` blocks of a host-resident context memory, per window.

    Defaults: the repository configs (``config/{mistral,llama-3,qwen}-inf-llm.yaml``): 128 init tokens, a
    4096-token window, 128-token blocks, 16 blocks per step (the paper's Llama-3 text says 32; the code: 16),
    4 representative tokens, windows of 512 queries, a cache of 32 blocks. ``budget`` (an int: entries attended
    per step and layer) sets ``topk = (budget - n_init - n_local) // block_size`` instead of ``topk``. A step also
    attends the not-yet-blocked remainder outside the window (fewer than ``block_size`` tokens at decode).
    """

    name = "infllm"
    summary = "Sliding window + init tokens + top-k retrieved blocks of a host-resident context memory"
    paper = "arXiv 2402.04617 (NeurIPS 2024)"
    policy = InfLLMPolicy
    budget_counts = "entries a step attends on the device (init + window + blocks); the block memory is kept off it"
    extrapolates: ClassVar[bool] = True  # memory at a fixed distance: prompts beyond the trained window work
    DEFAULT_TOPK: ClassVar[int] = 16
    MIN_TOPK: ClassVar[int] = 0

    n_init: int = param(128, "first tokens always attended (attention sinks)")
    n_local: int = param(4096, "sliding window of recent tokens, attended at their true distance")
    block_size: int = param(128, "tokens per memory block")
    topk: int | None = param(None, "blocks retrieved per step (None: from budget, else the default)")
    budget: int | float | None = param(
        None, "entries a step attends, n_init + n_local + topk x block_size (a float: a fraction of the prompt)"
    )
    repr_topk: int = param(4, "most-attended tokens whose keys represent a block")
    exc_block_size: int = param(512, "prompt queries per retrieval window")
    max_cached_block: int | None = param(None, "blocks cached on the device (None: twice what one step retrieves)")
    cache_strategy: str = param("lru", "device cache eviction: lru, or lru-s (lowest decayed score)")
    score_decay: float = param(0.1, "lru-s only: per-step decay of a cached block's score")

    def validate(self) -> None:
        check_int("n_init", self.n_init, 0)
        check_int("n_local", self.n_local, 1)
        check_int("block_size", self.block_size, 1)
        check_int("repr_topk", self.repr_topk, 1, self.block_size)
        check_int("exc_block_size", self.exc_block_size, 1, self.n_local)
        check_choice("cache_strategy", self.cache_strategy, ("lru", "lru-s"))
        check_float("score_decay", self.score_decay, 0.0, 1.0, low_open=True)
        if self.topk is not None:
            check_int("topk", self.topk, self.MIN_TOPK)
        if isinstance(self.budget, float):
            check_budget(self.budget)  # a fraction of the prompt: resolved by for_prompt
            if self.topk is not None:
                raise ValueError(f"pass budget or topk, not both (budget={self.budget!r}, topk={self.topk})")
        elif self.budget is not None:
            lowest = self.n_init + self.n_local + max(self.MIN_TOPK, 1) * self.block_size
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < lowest:
                raise ValueError(
                    f"budget must be an int >= n_init + n_local + block_size = {lowest} (init tokens, window and one "
                    f"block), got {self.budget!r}"
                )
            derived = (self.budget - self.n_init - self.n_local) // self.block_size
            if self.topk is not None and self.topk != derived:
                raise ValueError(
                    f"budget={self.budget} and topk={self.topk} disagree: budget = n_init + n_local + topk x "
                    f"block_size = {self.n_init} + {self.n_local} + topk x {self.block_size} gives topk = {derived}; "
                    "pass one of them"
                )
        if self.max_cached_block is not None:
            fraction = isinstance(self.budget, float)  # the step's block count is known once resolved
            check_int("max_cached_block", self.max_cached_block, 1 if fraction else max(1, self.max_blocks_per_step))

    def for_prompt(self, prompt_tokens: int) -> InfLLM:
        """A fractional ``budget`` becomes ``round(budget x prompt_tokens)`` entries: ``n_init``, ``n_local`` and
        ``block_size`` stay as configured and the blocks retrieved per step take the rest."""
        if not isinstance(self.budget, float):
            return self
        check_int("prompt_tokens", prompt_tokens, 1)
        entries = resolve_budget(self.budget, prompt_tokens)
        lowest = self.n_init + self.n_local + max(self.MIN_TOPK, 1) * self.block_size
        if entries < lowest:
            raise ValueError(
                f"budget={self.budget} of a {prompt_tokens}-token prompt is {entries} entries, fewer than n_init + "
                f"n_local + block_size = {lowest}: raise the budget or shrink n_init, n_local or block_size"
            )
        resolved = dataclasses.replace(self, budget=entries)
        object.__setattr__(resolved, "name", self.name)  # presets keep their name
        return resolved

    @property
    def blocks_per_step(self) -> int:
        """``topk``: given, derived from ``budget``, or the default."""
        if self.topk is not None:
            return self.topk
        if isinstance(self.budget, float):
            raise ValueError(
                f"{self.name}: budget={self.budget} is a fraction of the prompt; resolve it with "
                "method.for_prompt(prompt_tokens) before building a cache (kvsieve.generate does)"
            )
        if self.budget is not None:
            return (self.budget - self.n_init - self.n_local) // self.block_size
        return self.DEFAULT_TOPK

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
    "infllm-2k",
    InfLLM,
    "InfLLM at 2K attended entries (64 init + 512 window + 46 blocks x 32): ActQKV's released substrate",
    n_init=64,
    n_local=512,
    block_size=32,
    budget=2048,
    repr_topk=4,
    exc_block_size=256,
    max_cached_block=128,
)
