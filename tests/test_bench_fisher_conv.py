"""``kfac-lens bench fisher --conv``: rows for a CNN's exact Fisher beside its own GEMM. Timings are not asserted."""

from __future__ import annotations

import math

import pytest

from kfac_lens import bench
from kfac_lens.bench.fisher import M_CONV, M_CONV_GEMM


@pytest.mark.timeout(120)
def test_conv_rows_agree_with_the_per_case_jacobian_baseline():
    df = bench.run(["fisher", "--quick", "--no-print", "--sizes", "60", "--baseline-max-cases", "40",
                    "--baseline-chunk", "32", "--conv"])
    assert list(df["method"])[-2:] == [M_CONV, M_CONV_GEMM]
    rows = df.set_index("method")
    assert rows.loc[M_CONV, "max_rel_diff"] < 1e-12
    assert math.isnan(rows.loc[M_CONV_GEMM, "max_rel_diff"]) and rows.loc[M_CONV_GEMM, "ratio_to_gemm"] == 1.0
    assert rows.loc[M_CONV, "ratio_to_gemm"] > 0
    assert any("CNN rows" in note for note in df.attrs["notes"])
