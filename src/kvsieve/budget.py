"""A budget: what a method may keep or attend, as a token count or as a fraction of the prompt.

``Budget(2048)`` is 2,048 entries (per layer and KV head; what they count depends on the method: entries stored,
or entries a decode step attends, as ``kvsieve methods`` says); ``Budget(0.2)`` is a fifth of the prompt, resolved
when the prompt's length is known (`Budget.resolve`). The int / float distinction is the one users write
(``kvsieve.method("snapkv", budget=0.2)``, ``budgets: [0.2, 2048]`` in a sweep), so ``1`` is one token and ``1.0``
the whole prompt.

A budget's `Budget.label` is how rows, keys and tables of ``kvsieve eval`` name it (``"2048"``, ``"0.2"``: the
number's ``repr``, as run directories have always written it); ``"-"`` (`FULL_LABEL`) names a run without a budget
(the full cache). `Budget.of` reads a label back, and `label_order` sorts labels: ``-`` first, then fractions,
then token counts, each by value.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["FULL_LABEL", "Budget", "label_order"]

FULL_LABEL = "-"  # the label of a run without a budget (the full cache)


@functools.total_ordering
@dataclass(frozen=True, eq=False)  # equality and hashing by kind and value: Budget(1) (a token) != Budget(1.0)
class Budget:
    """A token count (an int >= 1) or a fraction of the prompt (a float in (0, 1]); validated on construction.

    Budgets order fractions before token counts, each by value (the order of a sweep's columns)."""

    value: int | float

    def __post_init__(self) -> None:
        _check(self.value, "budget")
        object.__setattr__(self, "value", float(self.value) if isinstance(self.value, float) else int(self.value))

    @classmethod
    def of(cls, value: Budget | int | float | str, name: str = "budget") -> Budget:
        """A budget from a `Budget`, an int (tokens), a float (a fraction of the prompt) or a row label
        (``"2048"``, ``"0.2"``). A bad value raises TypeError or ValueError naming ``name``."""
        if isinstance(value, Budget):
            return value
        return cls.from_number(_parse_label(value, name) if isinstance(value, str) else value, name)

    @classmethod
    def from_number(cls, value: int | float, name: str = "budget") -> Budget:
        """A budget from an int (tokens) or a float (a fraction of the prompt) only, as a method's ``budget``
        parameter takes it; anything else raises TypeError or ValueError naming ``name``."""
        _check(value, name)
        return cls(value)

    @property
    def is_fraction(self) -> bool:
        """True for a fraction of the prompt, False for a token count."""
        return isinstance(self.value, float)

    @property
    def label(self) -> str:
        """How rows, keys and tables name this budget: the number's ``repr`` (``"2048"``, ``"0.2"``)."""
        return repr(self.value)

    def resolve(self, n_tokens: int) -> int:
        """Entries for a prompt of ``n_tokens`` tokens: a fraction rounds (and is at least 1), a count is itself."""
        if self.is_fraction:
            return max(1, round(self.value * n_tokens))
        return int(self.value)

    def _key(self) -> tuple[int, int | float]:
        return (0 if self.is_fraction else 1, self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"Budget({self.value!r})"


def label_order(label: str) -> tuple[int, Budget | str]:
    """Sort key of a row's budget label: ``-`` (no budget) first, then budgets in their order (fractions, then
    token counts, each by value); a label that names no budget (not written by kvsieve) last."""
    if label == FULL_LABEL:
        return (0, "")
    try:
        return (1, Budget.of(label))
    except (TypeError, ValueError):
        return (2, label)


def _check(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be an int (tokens) or a float in (0, 1] (fraction of the prompt), got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{name} must be >= 1 token when given as an int, got {value}")
    if isinstance(value, float) and not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} as a fraction of the prompt must be in (0, 1], got {value}")


def _parse_label(label: str, name: str) -> int | float:
    """The number a label names: an integer is a token count, any other finite number a fraction (a float's
    ``repr``)."""
    if re.fullmatch(r"[+-]?[0-9]+", label):
        return int(label)
    try:
        value = float(label)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and label == label.strip():
        return value
    what = "no budget (the full cache)" if label == FULL_LABEL else "no budget"
    raise ValueError(
        f"{name} label {label!r} names {what}: a budget label is an int (tokens, e.g. '2048') or a float "
        "(a fraction of the prompt, e.g. '0.2')"
    )
