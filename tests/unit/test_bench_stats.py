"""Median and spread of repeated samples."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ukgpu.tools.bench.stats import StatsError, rate, summarize


def test_even_count_interpolates_median_and_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.min, s.max) == (2.5, 1.0, 4.0)
    assert (s.q1, s.q3) == (1.75, 3.25)  # linear interpolation between order statistics
    assert s.iqr == pytest.approx(1.5)


def test_odd_count_and_single_sample():
    s = summarize([10.0, 30.0, 20.0])
    assert (s.median, s.q1, s.q3) == (20.0, 15.0, 25.0)
    one = summarize([7.5])
    assert one.median == one.min == one.max == one.q1 == one.q3 == 7.5


def test_one_outlier_moves_max_not_median_or_iqr():
    base = summarize([1.0, 1.1, 0.9, 1.0, 1.05])
    spiked = summarize([1.0, 1.1, 0.9, 1.0, 100.0])
    assert spiked.median == base.median and spiked.max == 100.0
    assert spiked.iqr == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_rejects_empty_and_non_finite(bad):
    with pytest.raises(StatsError, match="rerun|repeat"):
        summarize(bad)


def test_rate_is_count_over_seconds_and_rejects_zero_durations():
    assert rate(128, [0.5, 2.0]) == [256.0, 64.0]
    with pytest.raises(StatsError, match="clock"):
        rate(1, [0.0])


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=40))
def test_order_invariants(xs):
    s = summarize(xs)
    assert s.min <= s.q1 <= s.median <= s.q3 <= s.max
    assert s.median == pytest.approx(float(np.median(xs)), rel=1e-12, abs=1e-9)
    assert summarize(list(reversed(xs))) == s
