"""Smoke tests for kfac_lens.bench. Timings are printed, never asserted."""

from __future__ import annotations

import math

import pytest

from kfac_lens import bench

COLUMNS = ["N", "method", "seconds", "ratio_to_gemm", "peak_MB", "max_rel_diff", "extrapolated"]
METHODS = [bench.M_OURS, bench.M_BASE, bench.M_GEMM]


def test_fisher_quick_through_main(capsys):
    assert bench.main(["fisher", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "fisher: exact Fisher of layers [1, 2, 3, 4] (P = 1680)" in out
    assert "torch threads=" in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["N", "method"])
    assert header.split() == COLUMNS
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] == "200"]
    assert len(rows) == 3
    for method, row in zip(METHODS, rows, strict=True):
        assert method in row


@pytest.mark.timeout(60)
def test_fisher_quick_table_and_agreement():
    df = bench.run(["fisher", "--quick", "--no-print", "--sizes", "150",
                    "--baseline-max-cases", "100", "--baseline-chunk", "64"])
    assert list(df.columns) == COLUMNS
    assert list(df["method"]) == METHODS
    assert set(df["N"]) == {150}
    assert df.attrs["P"] == 1680 and df.attrs["threads"] >= 1
    rows = df.set_index("method")
    # ours and the independent per-case Jacobian baseline compute the same matrix
    assert rows.loc[bench.M_OURS, "max_rel_diff"] < 1e-12
    assert rows.loc[bench.M_BASE, "max_rel_diff"] == rows.loc[bench.M_OURS, "max_rel_diff"]
    assert math.isnan(rows.loc[bench.M_GEMM, "max_rel_diff"])
    assert rows.loc[bench.M_GEMM, "ratio_to_gemm"] == 1.0
    assert list(df["extrapolated"]) == [False, True, False]
    assert (df["seconds"] > 0).all() and (df["peak_MB"] >= 0).all()


def test_unknown_benchmark_is_rejected():
    with pytest.raises(SystemExit):
        bench.main(["no-such-benchmark"])
