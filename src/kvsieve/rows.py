"""Batch rows of a `SieveLayer`: one batch-1 method state per prompt row.

A padded batch is run as its rows: each `Row` holds its own `LayerPolicy`, `LayerMeter` and logical length, and
is fed only its own tokens (left padding removed), so that every row keeps, attends and measures exactly what the
prompt alone would -- whatever state a method keeps (NACL's random draw, H2O's accumulated scores, InfLLM's
blocks, RefreshKV's refresh decisions, a fractional budget resolved from the row's own length).

* `real_tokens` reads, from the mask transformers built for the forward, how many of the chunk's new tokens are
  real in each row (the chunk is left-padded: a row's real tokens are its last ones);
* `row_sources` says which old row each new row copies (beam search's ``reorder_cache``, ``batch_select_indices``,
  ``batch_repeat_interleave``); `kvsieve.cache.SieveCache` moves or deep-copies the rows accordingly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvsieve.methods.base import LayerPolicy, PromptLayout

__all__ = ["LayerMeter", "Row", "real_tokens", "row_sources"]


@dataclass
class LayerMeter:
    """What one row of a layer measured (the layer itself only stores and dispatches): entries attended, the
    stored size and bytes around compression, and optionally every call's attended positions (``trace``)."""

    trace: list[torch.Tensor] | None = None  # per attention call: the logical positions attended, [1, H_kv, S]
    attended_total: int = 0  # sum over attention calls of the entries attended per KV head
    attend_calls: int = 0
    stored_after_prefill: int | None = None
    bytes_after_prefill: int | None = None
    bytes_before_compress: int | None = None

    def record(self, positions: torch.Tensor | Callable[[], torch.Tensor], count: int | None = None) -> None:
        """The positions ``[B, H_kv, S]`` an attention call attended; or a function that builds them, with ``count``
        (S), called only when tracing (a decode step need not build a tensor nobody reads)."""
        if not callable(positions):
            count = positions.shape[-1]
        elif count is None:
            raise ValueError("record: a function that builds the positions needs their count")
        self.attended_total += count
        self.attend_calls += 1
        if self.trace is None:
            return
        built = positions() if callable(positions) else positions
        if built.shape[-1] != count:
            raise ValueError(f"record: {built.shape[-1]} positions built, {count} counted")
        self.trace.append(built.detach().clone())

    def mark(self) -> tuple[int, int]:
        """A point to measure from (`attended_since`)."""
        return self.attended_total, self.attend_calls

    def attended_since(self, mark: tuple[int, int]) -> float | None:
        """Mean entries per KV head attended by the calls made since ``mark`` (None: no call)."""
        calls = self.attend_calls - mark[1]
        return (self.attended_total - mark[0]) / calls if calls else None

    def take_counts(self, other: LayerMeter) -> None:
        """Adopt ``other``'s counts and trace (a shared prefill: the full cache's attention is this layer's)."""
        self.attended_total, self.attend_calls = other.attended_total, other.attend_calls
        if self.trace is not None and other.trace is not None:
            self.trace = [t.clone() for t in other.trace]


@dataclass
class Row:
    """One prompt row of a layer: its method state, its meter, the tokens it has read (padding excluded) and,
    when rows differ, its own prompt layout (None: the layer's)."""

    policy: LayerPolicy
    meter: LayerMeter
    seen: int = 0
    layout: PromptLayout | None = field(default=None)


def real_tokens(mask: torch.Tensor | None, n_new: int, batch: int) -> list[int]:
    """How many of the ``n_new`` new tokens of each row are real, from the forward's attention mask.

    ``mask``: ``[B, 1 or H, q, kv]`` (bool: True = attend; float: 0 = attend) whose last ``n_new`` columns are the
    chunk, or None (no padding anywhere). A left-padded row's last query is real and sees all of its row's real new
    tokens and none of its padding, so its count is the number of allowed columns among the last ``n_new`` in the
    last query row. A row with no real token in the chunk sees nothing there (0).
    """
    if mask is None:
        return [n_new] * batch
    last = mask[:, 0, -1, -n_new:]
    allowed = last if last.dtype == torch.bool else last == 0
    counts = allowed.sum(dim=-1).tolist()
    if len(counts) == 1 and batch > 1:  # a mask broadcast over the batch
        counts = counts * batch
    return [int(c) for c in counts]


def row_sources(indices: torch.Tensor | list[int], n_rows: int, name: str) -> list[int]:
    """The old row each new row is taken from (``indices``: one old row per new row), checked against ``n_rows``."""
    sources = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    bad = [i for i in sources if not 0 <= int(i) < n_rows]
    if bad:
        raise IndexError(f"{name}: row {bad[0]} out of range for a batch of {n_rows}")
    return [int(i) for i in sources]
