"""PyramidKV: SnapKV selection with budgets that shrink from the bottom layers to the top.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv 2406.02069).
Lower layers attend broadly, upper layers focus on few tokens, so the per-layer capacity follows an arithmetic
sequence: with average budget ``B`` and window ``w``, the top layer keeps ``(B - w) / beta`` selected entries and
the bottom layer ``2 (B - w) - (B - w) / beta``, so the mean over layers stays at ``B`` (the schedule of the
authors' code, KVCache-Factory, including its clamp when the prompt is short). Each layer then selects like SnapKV.

PyramidKV is SnapKV composed with the pyramid schedule (`kvsieve.methods.schedules.Pyramid`): nothing here but its
defaults (KVCache-Factory's window of 8) and the steepness ``beta``. Each layer stores a tensor of its own size:
memory really follows the pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsieve.methods.base import check_int, param, register
from kvsieve.methods.schedules import Pyramid, pyramid_budgets
from kvsieve.methods.snapkv import SnapKV

__all__ = ["PyramidKV", "pyramid_budgets"]


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with a pyramidal per-layer schedule; ``budget`` is the mean over layers."""

    name = "pyramidkv"
    summary = "SnapKV selection with per-layer budgets shrinking towards the top layers"
    paper = "arXiv 2406.02069"
    budget_counts = "entries stored after the prompt, averaged over layers (the bottom layers keep more)"

    window_size: int = param(8, "last prompt queries whose attention scores the prefix; kept in every layer")
    layer_schedule: str = param("pyramid", "pyramid (the only one: snapkv with layer_schedule=... for others)")
    beta: int = param(20, "pyramid steepness: the top layer keeps (budget - window) / beta selected entries")

    def validate(self) -> None:
        super().validate()
        check_int("beta", self.beta, 1)
        if self.layer_schedule != "pyramid":
            raise ValueError(
                f"layer_schedule must be 'pyramid' for pyramidkv (SnapKV + the pyramid), got {self.layer_schedule!r};"
                " use snapkv with layer_schedule=... for another schedule"
            )

    def pyramid(self) -> Pyramid:
        return Pyramid(beta=self.beta, window=self.window_size)
