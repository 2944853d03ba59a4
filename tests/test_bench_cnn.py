"""Benchmark ``cnn`` in a tiny configuration: the table's structure, the grids, the options it refuses.

No timing is asserted and no answer is hard-coded: the benchmark's numbers are reported, not tested.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kfac_lens import bench
from kfac_lens.bench import cnn

TINY = {  # two-value starting grids (a best at an edge must then be widened)
    "K-FAC": cnn.Tuning((("lambda_init", (0.1, 1.0), False),)),
    "SGD-Nesterov": cnn.Tuning((("lr", (0.1, 0.4), False), ("batch", (64, 128), True)), {"momentum": 0.9}),
}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return cnn.cnn_benchmark(budget_s=0.3, tune_s=0.06, data="digits", seeds=[0, 1, 2],
                             methods=["K-FAC", "SGD-Nesterov"], evals=4, tunings=TINY, verbose=False)


def test_table_has_a_row_per_method_with_medians_inside_their_ranges(table):
    assert list(table["method"]) == ["K-FAC", "SGD-Nesterov"]
    cols = ["iterations", *(f"{w} error @ {t:g} s" for w in ("train", "test") for t in (0.075, 0.15, 0.3)),
            "s to SGD's error"]
    for c in cols:
        assert {c, f"{c} min", f"{c} max"} <= set(table.columns)
        for _, r in table.iterrows():
            assert r[f"{c} min"] <= r[c] <= r[f"{c} max"]
    errors = table[[c for c in table.columns if "error @" in c]].to_numpy().ravel()
    assert ((errors >= 0) & (errors <= 1)).all()
    assert (table["iterations min"] >= 1).all()
    runs = table.attrs["runs"]
    assert len(runs) == 6 and sorted(set(runs["seed"])) == [0, 1, 2]
    assert table.attrs["seeds"] == [0, 1, 2]
    assert table.attrs["tune_seeds"] == [3, 4]  # by default tuned on seeds held out from the runs


def test_runs_spend_the_budget_and_sgd_reaches_its_own_median(table):
    for h in table.attrs["histories"].values():
        assert h["time"].iloc[0] == 0 and h["time"].iloc[-1] >= 0.3  # stops at the first step past the budget
        assert h["time"].is_monotonic_increasing and h["iteration"].is_monotonic_increasing
    target = table.attrs["target"]
    finals = sorted(float(table.attrs["histories"]["SGD-Nesterov", s]["train error"].iloc[-1]) for s in (0, 1, 2))
    assert target == finals[1]
    assert math.isfinite(float(table.set_index("method").loc["SGD-Nesterov", "s to SGD's error"]))


def test_every_grid_has_an_interior_best_or_was_widened(table):
    for method, searches in table.attrs["searches"].items():
        assert list(searches) == [g[0] for g in TINY[method].grids]
        for key, s in searches.items():
            assert s.interior or s.extensions == 2, (method, key, s.describe())
            assert len(s.grid) >= 2 + s.extensions and set(s.scores) == set(s.grid)
            assert s.best == min(s.grid, key=lambda v: (s.scores[v], v))
        settings = table.attrs["settings"][method]
        assert all(k in settings for k in searches)
    assert table.attrs["settings"]["SGD-Nesterov"]["momentum"] == 0.9
    log = table.attrs["tuning"]
    assert set(log["method"]) == {"K-FAC", "SGD-Nesterov"} and log["error"].between(0, 1).all()


def test_command_line_and_bad_options():
    df = bench.run(["cnn", "--quick", "--no-print", "--methods", "SGD-Nesterov", "--seeds", "0", "--budget", "0.2",
                    "--tune", "0.05"])
    assert list(df["method"]) == ["SGD-Nesterov"] and "cnn" in bench.BENCHMARKS
    with pytest.raises(ValueError, match="threads"):
        bench.run(["cnn", "--quick", "--threads", "2"])
    with pytest.raises(ValueError, match="SGD-Nesterov"):
        cnn.cnn_benchmark(methods=["K-FAC"], verbose=False)
    with pytest.raises(ValueError, match="data"):
        cnn.load_problem("cifar")
    with pytest.raises(ValueError, match="method"):
        cnn.make_optimizer("LBFGS", cnn.SmallCNN(), None, 0)
    with pytest.raises(ValueError, match="positive"):
        cnn.cnn_benchmark(budget_s=0, verbose=False)
