"""How InfLLM's (and ActQKV's) block structure follows from a budget: the entries a decode step attends per layer.

A step attends the ``n_init`` init tokens, the local window of ``n_local`` tokens and ``topk`` blocks of
``block_size`` tokens, so a budget ``b`` is split as ``n_init + n_local + topk x block_size <= b`` (as released, a
step also attends the block still filling, fewer than ``block_size`` entries; ``strict_budget`` cuts it first).
The rule scales ActQKV's released Llama-3 configuration, which is what it gives at ``b = 2048``:

* ``block_size``: the largest power of two whose square is at most ``b`` (32 at 2048: ``32^2 <= 2048 < 64^2``);
* ``n_init = b // 32`` (64), the window ``b // 4`` (512), and ``topk`` blocks fill the rest
  (``(2048 - 64 - 512) // 32 = 46``); the window also takes what the blocks leave (less than one block), so the
  three add up to ``b`` exactly;
* ``exc_block_size`` (queries per prompt window): the largest power of two <= ``n_local / 2``, at most 512 (256);
* ``repr_topk = min(4, block_size)`` (4);
* the device block cache: the smallest power of two >= 2 x topk (and >= ActQKV's ``max_blocks``): 92 -> 128;
* ActQKV's per-layer clamp: ``max_blocks = 2 x topk`` (92) and ``min_blocks = round(topk x 32 / 46)`` (32), the
  released floor's share of ``topk``, so ``min_blocks <= topk`` at every budget.

Parameters the user set are kept and the others derived around them; a set that cannot fit is refused with the
parameters named. Budgets below `MIN_BUDGET` are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MIN_BUDGET = 32  # entries: at 32 the rule gives 1 init token, a window of 11 and 5 blocks of 4
INIT_SHARE = 32  # n_init = budget // INIT_SHARE
WINDOW_SHARE = 4  # n_local ~ budget // WINDOW_SHARE
MAX_EXC_BLOCK = 512  # InfLLM's released prompt window
REPR_TOKENS = 4  # the released repr_topk
FLOOR_BLOCKS, FLOOR_OF = 32, 46  # ActQKV's released floor: 32 blocks of topk 46


def power_of_two_at_most(x: int) -> int:
    """The largest power of two <= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x).bit_length() - 1)


def power_of_two_at_least(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


def derive_structure(budget: int, given: Mapping[str, int]) -> dict[str, int]:
    """``n_init``, ``n_local``, ``block_size``, ``topk``, ``exc_block_size`` and ``repr_topk`` for ``budget`` entries
    per step, keeping the values in ``given`` (what the user set). Raises ValueError naming the given parameters
    when they cannot fit ``n_init + n_local + topk x block_size <= budget`` (with at least one block when ``topk``
    is derived) or when ``block_size > n_local`` (a step's window must be able to hand a whole block to memory)."""
    n_init = given.get("n_init", budget // INIT_SHARE)
    n_local = given.get("n_local")
    block_size = given.get("block_size")
    if block_size is None:
        block_size = power_of_two_at_most(math.isqrt(budget))
        if n_local is not None:
            block_size = min(block_size, power_of_two_at_most(n_local))
    topk = given.get("topk")
    values = {"n_init": n_init, "n_local": n_local, "block_size": block_size, "topk": topk}
    if topk is None:
        window = n_local if n_local is not None else budget // WINDOW_SHARE
        topk = (budget - n_init - window) // block_size
        if topk < 1:
            raise _conflict(budget, {**values, "n_local": window, "topk": 1}, given, "and at least one block")
        values["topk"] = topk
        if n_local is None:  # the window takes what the blocks leave
            values["n_local"] = n_local = budget - n_init - topk * block_size
    elif n_local is None:
        values["n_local"] = n_local = budget - n_init - topk * block_size
        if n_local < block_size:
            raise _conflict(budget, {**values, "n_local": block_size}, given, "and a window of one block")
    if n_init + n_local + topk * block_size > budget:
        raise _conflict(budget, values, given, "")
    if block_size > n_local:
        raise ValueError(
            f"with a budget, block_size must be <= n_local (blocks are cut from the window; budget={budget}); got "
            f"{_shown(values, given, 'block_size', 'n_local')}"
        )
    exc = given.get("exc_block_size", min(MAX_EXC_BLOCK, power_of_two_at_most(max(1, n_local // 2))))
    repr_topk = given.get("repr_topk", min(REPR_TOKENS, block_size))
    return {**values, "exc_block_size": exc, "repr_topk": repr_topk}


def derive_cache_blocks(topk: int, most: int) -> int:
    """Device cache capacity in blocks: the smallest power of two >= ``2 x topk`` and >= ``most``, the most blocks
    one layer's step can take (ActQKV's ``max_blocks``)."""
    return power_of_two_at_least(max(1, 2 * topk, most))


def derive_min_blocks(topk: int) -> int:
    """ActQKV's per-layer floor: the released floor's share of ``topk`` (32 of 46), rounded, at least 1."""
    return max(1, (topk * FLOOR_BLOCKS + FLOOR_OF // 2) // FLOOR_OF)


def _shown(values: Mapping[str, int | None], given: Mapping[str, int], *names: str) -> str:
    return ", ".join(f"{n}={values[n]} ({'set' if n in given else 'derived'})" for n in names)


def _conflict(budget: int, values: Mapping[str, int], given: Mapping[str, int], extra: str) -> ValueError:
    """The one-line error for parameters that do not fit the budget, naming those the user set."""
    names = ("n_init", "n_local", "block_size", "topk")
    set_names = [n for n in names if n in given]
    total = values["n_init"] + values["n_local"] + values["topk"] * values["block_size"]
    parts = f"{values['n_init']} + {values['n_local']} + {values['topk']} x {values['block_size']} = {total}"
    who = ", ".join(f"{n}={given[n]}" for n in set_names) or "the derived structure"
    return ValueError(
        f"{who} cannot fit budget={budget}: n_init + n_local + topk x block_size{' ' + extra if extra else ''} "
        f"is {parts} entries ({_shown(values, given, *names)}); lower {' or '.join(set_names) or 'them'} or raise "
        "the budget"
    )
