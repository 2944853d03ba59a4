"""The training comparison over several seeds: one history per method with a ``seed`` column, drawn as the
median with a min–max band (Section 13's curves, issue 10's robust comparisons)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from kfac_lens import zoo
from kfac_lens.figures import figure_training_curves
from kfac_lens.figures.training import seed_band


def _seeded(scales, n=20, step=1.0):
    it = np.arange(1, n + 1)
    return pd.concat([pd.DataFrame({"iteration": it, "time": step * s * it, "loss": s / it, "batch_size": 10,
                                    "seed": k}) for k, s in enumerate(scales)], ignore_index=True)


def test_seed_band_median_and_range_on_the_common_range():
    h = _seeded([1.0, 2.0, 4.0])
    x, med, lo, hi = seed_band(h, "iteration", "loss", log_x=True)
    assert x[0] == 1 and x[-1] == 20 and np.all(np.diff(x) > 0)
    np.testing.assert_allclose(med, 2.0 / x, rtol=1e-9)  # the middle seed
    np.testing.assert_allclose(lo, 1.0 / x, rtol=1e-9)
    np.testing.assert_allclose(hi, 4.0 / x, rtol=1e-9)
    x, med, _, _ = seed_band(h, "time", "loss")  # seeds cover time [1, 20], [2, 40], [4, 80]: common [4, 20]
    assert x[0] == 4.0 and x[-1] == 20.0
    assert seed_band(pd.DataFrame({"time": [1.0, 2.0, 5.0, 6.0], "loss": 1.0, "seed": [0, 0, 1, 1]}),
                     "time", "loss") is None  # no common range


def test_figure_draws_a_band_per_seeded_method():
    drawn = figure_training_curves({"kfac": _seeded([1.0, 2.0, 4.0]), "sgd": _seeded([3.0])})
    fig, df = drawn
    ax = fig.axes[0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # one band: the seeded method
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["kfac (median, min–max of 3 seeds)", "sgd"]
    cases_ax = next(a for a in fig.axes if "cases processed" in a.get_xlabel())
    assert cases_ax.lines[0].get_xdata().max() == 200  # cumulated per seed: 20 iterations × 10 cases
    assert set(df["seed"]) == {0, 1, 2}


def test_training_comparison_stacks_seeds(tmp_path):
    hist = zoo.training_comparison("quick", "digits", iterations=3, cache_dir=tmp_path, device="cpu",
                                   progress=False, seeds=(0, 1))
    assert list(hist) == ["K-FAC block-diagonal", "K-FAC block-tridiagonal", "SGD-Nesterov", "Adam"]
    for h in hist.values():
        assert sorted(h["seed"].unique()) == [0, 1]
    single = zoo.training_comparison("quick", "digits", iterations=3, cache_dir=tmp_path, device="cpu",
                                     progress=False, seed=1)  # cached by the seeded call
    kb = hist["K-FAC block-diagonal"]
    pd.testing.assert_frame_equal(kb[kb["seed"] == 1].drop(columns="seed").reset_index(drop=True),
                                  single["K-FAC block-diagonal"])


def _errors(first_low: int, last: int = 100) -> pd.DataFrame:
    """A history recording its error every 10 iterations: 2 before the given iteration, 0.5 from it on."""
    it = list(range(10, last + 1, 10))
    err = [2.0 if k < first_low else 0.5 for k in it]
    return pd.DataFrame({"iteration": it, "time": it, "loss": err, "error": err})


def test_extra_progress_per_iteration_counts_the_iterations_to_the_reference_error():
    from kfac_lens.figures import extra_progress_per_iteration

    ref = _errors(100)  # reaches its last error, 0.5, at iteration 100
    other = _errors(80)  # at iteration 80
    assert extra_progress_per_iteration(ref, other) == pytest.approx(100 / 80 - 1)
    assert extra_progress_per_iteration(ref, ref) == 0.0
    assert extra_progress_per_iteration(other, ref) == pytest.approx(80 / 100 - 1)  # the slower run as "other"
    never = pd.DataFrame({"iteration": [10, 20], "time": [1, 2], "loss": [5.0, 5.0], "error": [5.0, 5.0]})
    assert math.isnan(extra_progress_per_iteration(ref, never))
    assert math.isnan(extra_progress_per_iteration(ref, ref.drop(columns="error")))


def test_training_comparison_without_baselines(tmp_path):
    hist = zoo.training_comparison("quick", "digits", iterations=2, cache_dir=tmp_path, device="cpu",
                                   progress=False, baselines=False)
    assert list(hist) == ["K-FAC block-diagonal", "K-FAC block-tridiagonal"]
    full = zoo.training_comparison("quick", "digits", iterations=2, cache_dir=tmp_path, device="cpu",
                                   progress=False)  # a cache entry of its own, with the baselines
    assert list(full) == ["K-FAC block-diagonal", "K-FAC block-tridiagonal", "SGD-Nesterov", "Adam"]
    assert len(list(tmp_path.glob("comparison-*.pt"))) == 2


def test_extra_progress_interpolates_between_the_recorded_errors():
    from kfac_lens.figures import extra_progress_per_iteration

    ref = pd.DataFrame({"iteration": [10, 20], "time": [1, 2], "loss": [1.0, 1.0], "error": [4.0, 1.0]})
    # "other" records 4 at iteration 10 and 0.25 at 20: in log error it passes 1 halfway, at 15
    other = ref.assign(error=[4.0, 0.25])
    assert extra_progress_per_iteration(ref, other) == pytest.approx(20 / 15 - 1)
