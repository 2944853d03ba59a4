"""Smoke test of the optimizer benchmark's table (no timing assertions: speed belongs in the benchmark)."""

from __future__ import annotations

import math

from kfac_lens import bench


def test_optimizer_benchmark_quick_table():
    df = bench.run(["optimizer", "--quick", "--budget", "1", "--tune", "0.2", "--no-print", "--threads", "1"])
    assert list(df["method"]) == ["K-FAC block-diagonal", "K-FAC block-tridiagonal", "SGD-Nesterov", "Adam"]
    for col in ("iterations", "s to SGD's best", "ratio to SGD's time", "s/iter @ m=1000", "iter-time ratio to SGD",
                "flop ratio to SGD"):
        assert col in df.columns
    for col in ("iterations", "s to SGD's best", "error @ 1 s", "iter-time ratio to SGD"):  # the ranges
        assert (df[f"{col} min"] <= df[col]).all() and (df[col] <= df[f"{col} max"]).all()
    sgd = df.set_index("method").loc["SGD-Nesterov"]
    assert sgd["ratio to SGD's time"] == 1.0 and sgd["iter-time ratio to SGD"] == 1.0
    assert sgd["flop ratio to SGD"] == 1.0
    kfac = df.set_index("method").loc[["K-FAC block-diagonal", "K-FAC block-tridiagonal"], "flop ratio to SGD"]
    assert (kfac > 1).all() and kfac.iloc[1] > kfac.iloc[0]  # (the tridiagonal inverse applies Ξ and Ξᵀ too)
    searches = df.attrs["searches"]  # each tuned value comes from its (possibly widened) grid
    assert sgd["lr / λ₀"] in searches["SGD-Nesterov"].grid and set(bench.SGD_LRS) <= set(searches["SGD-Nesterov"].grid)
    assert df.set_index("method").loc["Adam", "lr / λ₀"] in searches["Adam"].grid
    assert df.set_index("method").loc["K-FAC block-diagonal", "lr / λ₀"] in searches["K-FAC"].grid
    assert df.attrs["seeds"] == [0, 1, 2] and len(df.attrs["histories"]) == 4 * 3  # every method on 3 seeds
    assert all(h["time"].iloc[-1] >= 1 or h["iteration"].iloc[-1] > 0 for h in df.attrs["histories"].values())
    assert math.isfinite(df.attrs["sgd_best"])
