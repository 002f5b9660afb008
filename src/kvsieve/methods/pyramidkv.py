"""PyramidKV: SnapKV selection with budgets that shrink from the bottom layers to the top.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv 2406.02069).
Lower layers attend broadly, upper layers focus on few tokens, so the per-layer capacity follows an arithmetic
sequence: with average budget ``B`` and window ``w``, the top layer keeps ``(B - w) / beta`` selected entries and
the bottom layer ``2 (B - w) - (B - w) / beta``, so the mean over layers stays at ``B`` (the schedule of the
authors' code, KVCache-Factory, including its clamp when the prompt is short). Each layer then selects like SnapKV.
Each layer stores a tensor of its own size: memory really follows the pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsieve.methods.base import check_int, param, register, resolve_budget
from kvsieve.methods.snapkv import SnapKV, SnapKVPolicy


def pyramid_budgets(average: int, n_prompt: int, n_layers: int, window: int, beta: int) -> list[int]:
    """Entries kept per layer (window included) for an average budget of ``average`` entries per layer."""
    if average >= n_prompt:
        return [n_prompt] * n_layers
    w = min(window, average)
    low = (average - w) // beta
    high = (average - w) * 2 - low
    if high >= n_prompt - w:  # short prompt: clamp the bottom layer to the prompt, keep the mean
        high = n_prompt - w
        low = (average - w) * 2 - high
    if n_layers == 1:
        return [average]
    step = (high - low) // (n_layers - 1)
    return [high - layer * step + w for layer in range(n_layers)]


class PyramidKVPolicy(SnapKVPolicy):
    def layer_budget(self, n_prompt: int) -> int:
        m = self.method
        average = resolve_budget(m.budget, n_prompt)
        return pyramid_budgets(average, n_prompt, self.info.n_layers, m.window_size, m.beta)[self.info.layer_idx]


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with a pyramidal per-layer schedule; ``budget`` is the mean over layers."""

    name = "pyramidkv"
    summary = "SnapKV selection with per-layer budgets shrinking towards the top layers"
    paper = "arXiv 2406.02069"
    policy = PyramidKVPolicy
    budget_counts = "entries stored after the prompt, averaged over layers (the bottom layers keep more)"

    window_size: int = param(8, "last prompt queries whose attention scores the prefix; kept in every layer")
    beta: int = param(20, "pyramid steepness: the top layer keeps (budget - window) / beta selected entries")

    def validate(self) -> None:
        super().validate()
        check_int("beta", self.beta, 1)
