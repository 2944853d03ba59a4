"""Smoke test of the optimizer benchmark's table (no timing assertions: speed belongs in the benchmark)."""

from __future__ import annotations

import math

from kfac_lens import bench


def test_optimizer_benchmark_quick_table():
    df = bench.run(["optimizer", "--quick", "--budget", "1.5", "--tune", "0.3", "--no-print", "--threads", "1"])
    assert list(df["method"]) == ["K-FAC block-diagonal", "K-FAC block-tridiagonal", "SGD-Nesterov", "Adam"]
    for col in ("iterations", "s to SGD's best", "ratio to SGD's time", "s/iter @ m=1000", "iter-time ratio to SGD"):
        assert col in df.columns
    sgd = df.set_index("method").loc["SGD-Nesterov"]
    assert sgd["ratio to SGD's time"] == 1.0 and sgd["iter-time ratio to SGD"] == 1.0
    assert sgd["lr / λ₀"] in bench.SGD_LRS and df.set_index("method").loc["Adam", "lr / λ₀"] in bench.ADAM_LRS
    assert df.set_index("method").loc["K-FAC block-diagonal", "lr / λ₀"] in bench.KFAC_LAMBDAS
    assert all(h["time"].iloc[-1] >= 1.5 or h["iteration"].iloc[-1] > 0 for h in df.attrs["histories"].values())
    assert math.isfinite(df.attrs["sgd_best"])
