"""Comparison tables (block_errors, error_by_kind, direction_errors) on constructed inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from kfac_lens import block_errors, direction_errors, error_by_kind
from kfac_lens.curvature.compare import block_square_sums

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = [2, 3, 1, 2]  # four layers, P = 8


def constructed():
    """ref with known block norms; approx = ref + a perturbation living in blocks (0, 1), (1, 0) and (0, 2)."""
    gen = torch.Generator().manual_seed(0)
    P = sum(SIZES)
    ref = torch.randn(P, P, generator=gen, dtype=torch.float64)
    E = torch.zeros(P, P, dtype=torch.float64)
    E[0:2, 2:5] = 0.5          # block (0, 1): tridiagonal, 6 entries
    E[2:5, 0:2] = -0.25        # block (1, 0)
    E[0:2, 5:6] = 2.0          # block (0, 2): off-tridiagonal, 2 entries
    return ref, ref + E, E


def blk(M, i, j):
    o = [0]
    for s in SIZES:
        o.append(o[-1] + s)
    return M[o[i]:o[i + 1], o[j]:o[j + 1]]


def test_block_errors_numbers():
    ref, approx, E = constructed()
    df = block_errors(approx, ref, SIZES, labels=["a", "b", "c", "d"], name="test")
    assert len(df) == 1 + len(SIZES) ** 2
    assert set(df["comparison"]) == {"test"}
    overall = df[df["kind"] == "overall"].iloc[0]
    assert overall["rel_error"] == pytest.approx(float(E.norm() / ref.norm()), rel=1e-12)
    assert overall["abs_error"] == pytest.approx(float(E.norm()), rel=1e-12)
    assert overall["ref_norm"] == pytest.approx(float(ref.norm()), rel=1e-12)
    labels = "abcd"
    for i in range(4):
        for j in range(4):
            row = df[(df["block_row"] == labels[i]) & (df["block_col"] == labels[j])]
            assert len(row) == 1
            row = row.iloc[0]
            kind = "diagonal" if i == j else ("tridiagonal" if abs(i - j) == 1 else "off-tridiagonal")
            assert row["kind"] == kind
            expect_abs = float(blk(E, i, j).norm())
            assert row["abs_error"] == pytest.approx(expect_abs, rel=1e-12, abs=0)
            assert row["ref_norm"] == pytest.approx(float(blk(ref, i, j).norm()), rel=1e-12)
            assert row["rel_error"] == pytest.approx(expect_abs / float(blk(ref, i, j).norm()), rel=1e-12, abs=0)
    assert df[(df["block_row"] == "a") & (df["block_col"] == "c")].iloc[0]["abs_error"] == pytest.approx(
        2.0 * math.sqrt(2))
    with pytest.raises(ValueError, match="P×P"):
        block_errors(approx[:-1, :-1], ref, SIZES)


def test_block_errors_zero_reference_block_is_nan():
    ref = torch.eye(3, dtype=torch.float64)
    df = block_errors(ref.clone(), ref, [1, 2])
    off = df[(df["block_row"] == 0) & (df["block_col"] == 1)].iloc[0]
    assert math.isnan(off["rel_error"]) and off["abs_error"] == 0.0


def test_error_by_kind_pools_blocks():
    ref, approx, E = constructed()
    df = error_by_kind(approx, ref, SIZES, name="t").set_index("kind")
    assert list(df.index) == ["overall", "diagonal", "tridiagonal", "off-tridiagonal"]

    def pooled(pred):
        num = den = 0.0
        for i in range(4):
            for j in range(4):
                if pred(i, j):
                    num += float(blk(E, i, j).norm()) ** 2
                    den += float(blk(ref, i, j).norm()) ** 2
        return math.sqrt(num / den)

    assert df.loc["overall", "rel_error"] == pytest.approx(float(E.norm() / ref.norm()), rel=1e-12)
    assert df.loc["diagonal", "rel_error"] == 0.0
    assert df.loc["tridiagonal", "rel_error"] == pytest.approx(pooled(lambda i, j: abs(i - j) == 1), rel=1e-12)
    assert df.loc["off-tridiagonal", "rel_error"] == pytest.approx(pooled(lambda i, j: abs(i - j) > 1), rel=1e-12)
    # with two layers there is no off-tridiagonal kind
    two = error_by_kind(approx[:5, :5], ref[:5, :5], [2, 3])
    assert list(two["kind"]) == ["overall", "diagonal", "tridiagonal"]
    # a reference's block table passed in (shared by several comparisons) gives the same table
    shared = error_by_kind(approx, ref, SIZES, name="t", ref_sums=block_square_sums(ref, SIZES)).set_index("kind")
    assert (shared["rel_error"] - df["rel_error"]).abs().max() < 1e-14


def test_block_square_sums_are_the_blocks_squared_norms():
    ref, _, _ = constructed()
    table = block_square_sums(ref, SIZES)
    assert table.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert float(table[i, j]) == pytest.approx(float(blk(ref, i, j).norm()) ** 2, rel=1e-13)


def test_direction_errors_numbers():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(6, generator=gen, dtype=torch.float64)
    orth = torch.randn(6, generator=gen, dtype=torch.float64)
    orth = orth - (orth @ ref) / (ref @ ref) * ref
    df = direction_errors({"twice": 2 * ref, "minus": -ref, "orth": orth, "same": ref.reshape(2, 3)},
                          ref, reference_name="natural").set_index("direction")
    assert set(df["reference"]) == {"natural"}
    assert df.loc["twice", "cosine"] == pytest.approx(1.0, abs=1e-14)
    assert df.loc["twice", "rel_norm_error"] == pytest.approx(1.0, rel=1e-14)
    assert df.loc["twice", "norm_ratio"] == pytest.approx(2.0, rel=1e-14)
    assert df.loc["minus", "cosine"] == pytest.approx(-1.0, abs=1e-14)
    assert df.loc["minus", "rel_norm_error"] == pytest.approx(2.0, rel=1e-14)
    assert df.loc["orth", "cosine"] == pytest.approx(0.0, abs=1e-14)
    r = float(orth.norm() / ref.norm())
    assert df.loc["orth", "norm_ratio"] == pytest.approx(r, rel=1e-12)
    assert df.loc["orth", "rel_norm_error"] == pytest.approx(math.sqrt(1 + r * r), rel=1e-12)
    assert df.loc["same", "rel_norm_error"] == 0.0 and df.loc["same", "cosine"] == pytest.approx(1.0)
