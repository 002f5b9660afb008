"""The Wilson score interval against published values, its edge cases, and the inputs it refuses."""

from __future__ import annotations

import math

import pytest

from kvsieve.eval.stats import format_interval, wilson_interval


def approx(pair: tuple[float, float]) -> object:
    return pytest.approx(pair, abs=5e-4)


def test_known_values():
    assert wilson_interval(8, 10) == approx((0.490, 0.943))
    assert wilson_interval(1, 3) == approx((0.061, 0.792))
    assert wilson_interval(8, 10, z=2.576) == approx((0.401, 0.960))  # 99%: wider than 95%


def test_no_and_all_successes_reach_zero_and_one_exactly():
    assert wilson_interval(0, 20) == approx((0.0, 0.161))
    assert wilson_interval(20, 20) == approx((0.839, 1.0))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_every_interval_holds_its_proportion_and_mirrors_its_complement():
    for n in range(1, 60):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            mirror_lo, mirror_hi = wilson_interval(n - k, n)
            assert (lo, hi) == pytest.approx((1 - mirror_hi, 1 - mirror_lo), abs=1e-12)


def test_fractional_successes_are_a_mean_score():
    """Summed fractional scores (string_match_part, qa_f1) give the interval of their mean over n samples."""
    lo, hi = wilson_interval(2.5, 5)
    assert (lo, hi) == approx((0.170, 0.830)) and lo + hi == pytest.approx(1.0)
    assert wilson_interval(1.75, 4) == approx((0.120, 0.817))


@pytest.mark.parametrize(
    ("successes", "n", "z", "message"),
    [
        (0, 0, 1.96, "n >= 1"),
        (0, -3, 1.96, "n >= 1"),
        (-0.1, 10, 1.96, r"in \[0, n=10\]"),
        (10.5, 10, 1.96, r"in \[0, n=10\]"),
        (math.nan, 10, 1.96, r"in \[0, n=10\]"),
        (5, 10, 0.0, "z must be positive"),
        (5, 10, math.nan, "z must be positive"),
    ],
)
def test_refuses_what_has_no_interval(successes, n, z, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(successes, n, z)


def test_refuses_a_fractional_count():
    with pytest.raises(TypeError):
        wilson_interval(1, 2.5)  # type: ignore[arg-type]


def test_format_interval():
    assert format_interval(0.4902, 0.9433) == "[0.49-0.94]"
    assert format_interval(0.4902, 0.9433, 3) == "[0.490-0.943]"
    assert format_interval(None, None) == "-"
