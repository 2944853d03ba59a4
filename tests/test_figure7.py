"""Figure 7 and the RescalingExplorer on a small digits autoencoder trained with block-tridiagonal K-FAC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kfac_lens import zoo
from kfac_lens.data import load_digits
from kfac_lens.figures import draw_figure7, figure7
from kfac_lens.optim import KFAC, train
from kfac_lens.sweep import UpdateVariant, figure7_gammas
from kfac_lens.widgets import RescalingExplorer

pytestmark = pytest.mark.usefixtures("agg_backend")

VARIANTS = ("re-scaled, momentum", "re-scaled, no momentum", "raw Δ (no re-scaling)")


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X = load_digits("train").X[:400]
        model = zoo.sparse_init_(zoo.autoencoder_net([64, 24, 6, 24, 64]), seed=0)
        opt = KFAC(model, "bernoulli", "tridiag", seed=0)
        train(model, opt, X, X, 25, batch_size=400, progress=False)
        yield opt, X
    finally:
        torch.set_num_threads(threads)


def test_figure7_curves_match_independent_proposals(trained):
    opt, X = trained
    gammas = [1e-2, 1.0, 1e2]
    fig, df = figure7(opt, X, X, gammas)
    assert set(df["variant"]) == set(VARIANTS) and sorted(set(df["gamma"])) == gammas
    # every point equals KFAC.propose at that γ (a separate code path: it recomputes ∇h and the inverse)
    for _, row in df.iterrows():
        rescale, momentum = UpdateVariant(row["variant"]).rescale, UpdateVariant(row["variant"]).momentum
        p = opt.propose(X, X, gamma=row["gamma"], rescale=rescale, momentum=momentum)
        assert row["improvement"] == pytest.approx(p.improvement, rel=1e-4, abs=1e-6)
        assert row["alpha"] == pytest.approx(p.alpha, rel=1e-4)
    raw = df[df["variant"] == "raw Δ (no re-scaling)"]
    assert np.allclose(raw["alpha"], 1.0) and np.allclose(raw["mu"], 0.0)
    assert len(fig.axes) == 1 and fig.axes[0].get_xscale() == "log"


def test_rescaling_never_worse_than_raw_in_the_quadratic_model(trained):
    # Re-scaling minimises M along Δ, so M(α*Δ) ≤ M(Δ) at every γ (Appendix E.4).
    opt, X = trained
    _, df = figure7(opt, X, X, figure7_gammas(opt.gamma, 3, 2, 6))
    piv = df.pivot(index="gamma", columns="variant", values="M")
    assert (piv["re-scaled, no momentum"] <= piv["raw Δ (no re-scaling)"] + 1e-9).all()
    assert (piv["re-scaled, momentum"] <= piv["re-scaled, no momentum"] + 1e-9).all()


def test_draw_figure7_plots_values_unclipped_and_marks_chosen_gamma(trained):
    import pandas as pd
    from matplotlib.figure import Figure

    variant = ["raw Δ (no re-scaling)"] * 3 + ["re-scaled, momentum"] * 3
    df = pd.DataFrame({"gamma": [0.1, 1.0, 10.0] * 2, "variant": variant,
                       "improvement": [-100.0, 0.5, 0.2, 1.0, 2.0, 0.5]})
    ax = Figure().add_subplot(1, 1, 1)
    lines = draw_figure7(ax, df, chosen_gamma=1.0, variants=["raw Δ (no re-scaling)", "re-scaled, momentum"])
    ydata = lines["raw Δ (no re-scaling)"].get_ydata()
    assert list(ydata) == [-100.0, 0.5, 0.2] and ax.get_ylim()[0] <= -100.0  # at its value, in view (symlog)
    assert ax.get_yscale() == "symlog"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("γ chosen by K-FAC" in t for t in labels) and not any("below the axis" in t for t in labels)


def test_rescaling_explorer_controls(trained):
    opt, X = trained
    ex = RescalingExplorer(opt, X, X, decades=(-2, 1), per_decade=1)
    first_png, first = ex.image.value, ex.data.copy()
    assert set(first["variant"]) == set(VARIANTS)
    assert len(ex.gammas) == len(set(first["gamma"]))
    # λ changes the re-scaled curves (not the raw Δ) and reuses the cached proposals
    ex.lambda_slider.value = ex.lambda_slider.value * 100
    raw = lambda d: d[d["variant"] == "raw Δ (no re-scaling)"]["improvement"].to_numpy()  # noqa: E731
    res = lambda d: d[d["variant"] == "re-scaled, no momentum"]["improvement"].to_numpy()  # noqa: E731
    np.testing.assert_allclose(raw(ex.data), raw(first))
    assert not np.allclose(res(ex.data), res(first))
    assert ex.image.value != first_png
    # momentum off: that curve disappears
    ex.momentum_toggle.value = False
    assert "re-scaled, momentum" not in set(ex.data["variant"]) and "re-scaled, momentum" not in ex.lines
    # a wider range adds γ values
    lo, hi = ex.range_slider.value
    ex.range_slider.value = (lo - 1, hi)
    assert min(ex.data["gamma"]) == pytest.approx(10 ** (lo - 1))
