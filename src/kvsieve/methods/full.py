"""Full cache: every token's K/V is kept and attended. The reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvsieve.methods.base import Method, register


@register
@dataclass
class Full(Method):
    """Keeps everything, in preallocated storage (no per-step ``torch.cat``)."""

    name = "full"
    summary = "Full KV cache (the reference): every token kept and attended"
    paper = "-"
