"""Per-layer budget schedules: how many entries each layer keeps for an average budget.

A schedule is any callable ``(average, n_prompt, n_layers, layer_idx) -> entries``: ``average`` is the budget
resolved for the prompt (tokens per layer and KV head), ``n_prompt`` the prompt's length. Eviction methods pick one
with their ``layer_schedule`` parameter (`kvsieve.methods.eviction.EvictionMethod`): ``"uniform"`` (every layer
keeps the budget), ``"pyramid"`` (PyramidKV's), or a callable such as ``Pyramid(beta=4, window=0)``. Each layer then
stores a tensor of its own size, so memory really follows the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvsieve.methods.base import check_int

LayerSchedule = Callable[[int, int, int, int], int]
SCHEDULE_NAMES = ("uniform", "pyramid")
PYRAMID_BETA = 20  # KVCache-Factory's default steepness


def uniform(average: int, n_prompt: int, n_layers: int, layer_idx: int) -> int:
    """Every layer keeps the average budget."""
    return average


def pyramid_budgets(average: int, n_prompt: int, n_layers: int, window: int, beta: int) -> list[int]:
    """Entries kept per layer (window included) for an average budget of ``average`` entries per layer.

    PyramidKV (arXiv 2406.02069) as its authors' code (KVCache-Factory) schedules it: the top layer keeps
    ``(average - w) // beta`` selected entries, the bottom ``2 (average - w)`` minus that, linearly in between
    (integer step), each plus the window ``w`` kept in every layer; when the bottom layer would exceed the prompt it
    is clamped and the top raised to keep the mean.
    """
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


@dataclass(frozen=True)
class Pyramid:
    """PyramidKV's schedule (`pyramid_budgets`): ``beta`` is the steepness, ``window`` the entries every layer keeps
    on top of its share (SnapKV's observation window; 0 for methods without one)."""

    beta: int = PYRAMID_BETA
    window: int = 0

    def __post_init__(self) -> None:
        check_int("beta", self.beta, 1)
        check_int("window", self.window, 0)

    def __call__(self, average: int, n_prompt: int, n_layers: int, layer_idx: int) -> int:
        if average >= n_prompt:  # nothing to evict: every layer may hold the budget (a rolling method grows to it)
            return average
        return pyramid_budgets(average, n_prompt, n_layers, self.window, self.beta)[layer_idx]


def check_schedule(value: object) -> None:
    """``layer_schedule`` is one of `SCHEDULE_NAMES` or a callable ``(average, n_prompt, n_layers, layer_idx)``."""
    if not (value in SCHEDULE_NAMES or callable(value)):
        names = ", ".join(map(repr, SCHEDULE_NAMES))
        raise ValueError(
            f"layer_schedule must be one of {names} or a callable (average, n_prompt, n_layers, layer_idx) -> "
            f"entries, got {value!r}"
        )


def layer_entries(schedule: LayerSchedule, average: int, n_prompt: int, n_layers: int, layer_idx: int) -> int:
    """What ``schedule`` gives layer ``layer_idx``, checked: an int >= 0."""
    entries = schedule(average, n_prompt, n_layers, layer_idx)
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
        raise ValueError(f"layer_schedule gave layer {layer_idx} {entries!r} entries; it must return an int >= 0")
    return entries
