"""Confidence intervals for the mean scores in summaries and reports.

A sweep cell is often 5-30 samples, so a mean score alone overstates what it shows: 0.20 of 5 and 0.20 of 500
are different results. The Wilson score interval stays inside [0, 1] and keeps a useful width at 0 and n
successes, where the normal approximation collapses to a point.
"""

from __future__ import annotations

import math
import operator

__all__ = ["format_interval", "wilson_interval"]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for the default ``z``) of the proportion ``successes / n``.

    Row scores are in [0, 1] per sample, mostly 0/1 but some fractional (``string_match_part``, ``qa_f1``, lm
    top-1 agreement), so ``successes`` is the sum of the scores and may be fractional: the interval treats the
    mean score as a proportion over ``n`` samples. Raises ``ValueError`` for ``n < 1`` (no interval exists; a
    summary with no scored rows writes none) and for ``successes`` outside [0, n] or a ``z`` that is not positive.
    """
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1 samples, got n={n}")
    if not 0.0 <= successes <= n:  # also refuses NaN
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    if not z > 0.0:
        raise ValueError(f"z must be positive, got {z}")
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    # the interval holds p and [0, 1] in exact arithmetic; clamping keeps that under rounding (e.g. hi = 1 at p = 1)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def format_interval(lo: float | None, hi: float | None, digits: int = 2) -> str:
    """``[lo-hi]`` for tables, or ``-`` where there is no interval (no scored rows)."""
    if lo is None or hi is None:
        return "-"
    return f"[{lo:.{digits}f}-{hi:.{digits}f}]"
