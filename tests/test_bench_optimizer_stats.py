"""The optimizer benchmark's statistics: grids widened until their best value is interior, and the median
with the min–max range over seeds (pure functions, no training)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kfac_lens.bench.optimizer import extend_grid, summarize, summarize_runs, tune_on_grid


def test_extend_grid_one_geometric_step_beyond_the_edge():
    assert extend_grid((1e-3, 1e-2, 1e-1), "high") == (1e-3, 1e-2, 1e-1, 1.0)
    assert extend_grid((150.0, 1.0, 10.0), "low") == (0.1, 1.0, 10.0, 150.0)
    with pytest.raises(ValueError):
        extend_grid((1.0, 2.0), "middle")


def test_best_at_the_high_edge_widens_the_grid_until_interior():
    calls = []

    def score(lr):  # minimum at lr = 0.1, beyond the grid's top 0.03
        calls.append(lr)
        return (math.log10(lr) + 1.0) ** 2

    r = tune_on_grid(score, (1e-3, 1e-2, 3e-2))
    assert r.extensions == 2 and r.grid == (1e-3, 1e-2, 3e-2, 0.09, 0.27)
    assert r.best == 0.09 and r.interior
    assert len(calls) == len(set(calls)) == 5  # each value scored once


def test_best_at_the_low_edge_and_divergence_counts_as_worst():
    r = tune_on_grid(lambda v: math.nan if v > 5 else v, (1.0, 10.0, 150.0))
    assert r.grid == (0.01, 0.1, 1.0, 10.0, 150.0)  # widened twice downwards ...
    assert r.best == 0.01 and not r.interior and r.extensions == 2  # ... and still at an edge: said so
    assert r.scores[150.0] == math.inf and "STILL AT AN EDGE" in r.describe()


def test_interior_best_is_not_widened():
    r = tune_on_grid(lambda v: abs(v - 1e-2), (3e-3, 1e-2, 3e-2))
    assert r.extensions == 0 and r.best == 1e-2 and r.interior and "interior" in r.describe()


def test_summarize_median_and_range():
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert summarize([4.0, 1.0, 2.0, 3.0]).median == 2.5
    s = summarize([1.0, math.inf, 2.0])  # ∞ = "never reached" stays in, the median is still finite
    assert s.median == 2.0 and s.high == math.inf and str(s) == "2 [1–—]"
    assert summarize([math.nan, 5.0]).median == 5.0 and math.isnan(summarize([math.nan]).median)
    assert str(summarize([7.0, 7.0])) == "7"


def test_summarize_runs_per_method_in_order():
    runs = pd.DataFrame({"method": ["b", "a", "b", "a", "b"], "seed": [0, 0, 1, 1, 2],
                         "err": [3.0, 10.0, 1.0, 20.0, 2.0]})
    df = summarize_runs(runs, ["err"])
    assert list(df["method"]) == ["b", "a"]
    assert df.loc[0, ["err", "err min", "err max"]].tolist() == [2.0, 1.0, 3.0]
    assert df.loc[1, ["err", "err min", "err max"]].tolist() == [15.0, 10.0, 20.0]
