"""The paper's claims (Appendix C and E.4), asserted on the quick preset's own metrics.

These use the zoo networks of `kfac-lens figures --preset quick` (trained once and cached), so that a
regression in the maths turns a test red rather than only changing a picture.
"""

from __future__ import annotations

import pytest

from kfac_lens import figures as F
from kfac_lens import zoo
from kfac_lens.study import CurvatureStudy
from kfac_lens.sweep import figure7_gammas

pytestmark = [pytest.mark.paper, pytest.mark.usefixtures("agg_backend")]


@pytest.fixture(scope="module")
def example():
    entry = zoo.example_network("quick", "mnist", progress=False)
    n = zoo.EXAMPLE_ANALYSIS_CASES["quick"]
    study = CurvatureStudy(entry.model, entry.X[:n], entry.y[:n], "categorical", layers=[1, 2, 3, 4])
    return entry, study


def test_example_network_is_partially_trained_as_in_the_paper(example):
    entry, study = example
    assert study.n_params == 1680  # W2..W5, each 20 × 21
    assert float(entry.history["error"].dropna().iloc[-1]) <= 0.05  # "roughly 5% training error"


def test_claim_F_hat_reproduces_the_tridiagonal_blocks_of_F_tilde(example):
    """Appendix C: F̂ captures the tridiagonal blocks of F̃ exactly; F̆ only the diagonal ones."""
    _, study = example
    _, df = F.figure5(study)
    tri = df[(df["comparison"].str.contains("F̂")) & df["kind"].isin(["diagonal", "tridiagonal"])]
    diag = df[(df["comparison"].str.contains("F̆")) & (df["kind"] == "diagonal")]
    assert len(tri) == 4 + 6 and len(diag) == 4
    assert tri["rel_error"].max() < 1e-8
    assert diag["rel_error"].max() < 1e-8
    off = df[(df["comparison"].str.contains("F̂")) & (df["kind"] == "off-tridiagonal")]
    assert off["rel_error"].min() > 0  # "very close to zero, but actually non-zero"


def test_claim_F_hat_inverse_beats_F_breve_inverse(example):
    """Appendix C: F̂⁻¹ approximates F̃⁻¹ better than F̆⁻¹ does, overall and even on the diagonal blocks,
    at the γ K-FAC held at that iteration (Figure 6)."""
    entry, study = example
    _, df = F.figure6(study, entry.gamma)
    err = df.set_index(["comparison", "kind"])["rel_error"]
    names = sorted({c for c, _ in err.index})
    breve = next(c for c in names if "F̆" in c)
    hat = next(c for c in names if "F̂" in c)
    for kind in ("overall", "diagonal"):
        assert err[(hat, kind)] < err[(breve, kind)], (kind, err[(hat, kind)], err[(breve, kind)])


def test_claim_rescaling_keeps_the_improvement_positive_where_raw_delta_fails():
    """Appendix E.4 / Figure 7: where the raw Δ makes h worse, the re-scaled update still improves it."""
    entry = zoo.autoencoder("quick", "mnist", progress=False)
    X, y = entry.X[:2000], entry.y[:2000]
    _, df = F.figure7(entry.optimizer, X, y, figure7_gammas(entry.gamma, 4, 2, 7))
    piv = df.pivot(index="gamma", columns="variant", values="improvement")
    bad = piv["raw Δ (no re-scaling)"] < 0
    assert bad.sum() >= 3, "the raw Δ should make h worse at small γ (Figure 7)"
    assert (piv.loc[bad, "re-scaled, no momentum"] > 0).all()
    assert (piv.loc[bad, "re-scaled, momentum"] > 0).all()
    assert piv["re-scaled, momentum"].max() > piv["raw Δ (no re-scaling)"].max()


def test_claim_figure7_on_the_papers_own_autoencoder():
    """The committed Figure 7 of the paper's 784-1000-500-250-30 autoencoder at iteration 500
    (figures/paper/metrics/figure7.csv, `kfac-lens figures --preset paper --fig 7`): the re-scaled updates
    improve h at every γ, momentum at least as much as none, and the raw Δ makes h worse at every γ up to
    K-FAC's own (Appendix E.4)."""
    from pathlib import Path

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "figures" / "paper" / "metrics" / "figure7.csv"
    df = pd.read_csv(path)
    piv = df.pivot(index="gamma", columns="variant", values="improvement").sort_index()
    chosen = float(df["chosen_gamma"].iloc[0])
    assert len(piv) >= 10 and piv.notna().all().all()
    assert (piv["re-scaled, momentum"] > 0).all() and (piv["re-scaled, no momentum"] > 0).all()
    assert (piv["re-scaled, momentum"] >= piv["re-scaled, no momentum"] * (1 - 1e-6)).all()
    assert (piv.loc[piv.index <= chosen * 1.001, "raw Δ (no re-scaling)"] < 0).all()
    assert piv["re-scaled, momentum"].max() > 10 * piv["raw Δ (no re-scaling)"].max()


def test_tridiagonal_progress_on_the_papers_own_autoencoder():
    """The committed run of K-FAC's two inverses on the paper's 784-1000-500-250-30 autoencoder to iteration
    400 of 500 (figures/paper/metrics/training_kfac.csv, `kfac-lens figures --preset paper --fig training
    --training-kfac-only --training-seeds 1 --training-iterations 400`). The paper (Section 13) finds that
    the block-tridiagonal inverse makes 25–40% more progress per iteration than the block-diagonal one;
    this run shows it ahead, but by +2% to +7% only (at every cut from iteration 100 to 400), and the test
    asserts what the run shows: ahead at every recorded iteration past 100, by less than 25%."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "figures" / "paper" / "metrics" / "training_kfac.csv"
    df = pd.read_csv(path)
    runs = {name: g.dropna(subset=["error"]).set_index("iteration")["error"] for name, g in df.groupby("run")}
    bd, td = runs["K-FAC block-diagonal"], runs["K-FAC block-tridiagonal"]
    assert bd.index.max() == td.index.max() == 400 and set(df["preset_iterations"]) == {500}
    assert bd.iloc[-1] < bd.iloc[0] / 100 and td.iloc[-1] < td.iloc[0] / 100  # both train
    late = bd.index[bd.index > 100]
    assert (td[late] < bd[late]).all()  # block-tridiagonal ahead at every recorded iteration past 100
    # iterations block-tridiagonal needs to reach block-diagonal's error at 400: the first record at or below
    # it, and the one before, interpolated in log error
    target = bd.iloc[-1]
    i = int(np.flatnonzero(td.to_numpy() <= target)[0])
    (k0, e0), (k1, e1) = (td.index[i - 1], td.iloc[i - 1]), (td.index[i], td.iloc[i])
    k_td = k0 + (k1 - k0) * (np.log(e0) - np.log(target)) / (np.log(e0) - np.log(e1))
    extra = 400 / k_td - 1
    assert 0 < extra < 0.25
    assert extra == pytest.approx(float(df["tridiag_extra_progress"].iloc[0]), rel=1e-9)
