"""Tests for kfac_lens.figures: panels show exactly the intended matrices, by the paper's display rules."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import kfac_lens as kl
from kfac_lens import figures as kf
from kfac_lens.curvature.blocks import neighbour_share_chance
from kfac_lens.study import CurvatureStudy
from digits_nets import digits, tanh_net, trained_net

LAYERS = [1, 2, 3]


pytestmark = pytest.mark.usefixtures("agg_backend")


@pytest.fixture(scope="module")
def net():
    return trained_net()


@pytest.fixture(scope="module")
def study(net):
    model, X, y = net
    return CurvatureStudy(model, X, y, "categorical", layers=LAYERS, name="tiny digits")


def panel_data(drawn):
    return [p.image.get_array().data for p in drawn.panels]


def assert_abs_equal(data, M, tol=1e-12):
    M = M.detach().double().numpy() if isinstance(M, torch.Tensor) else M
    assert data.shape == M.shape
    np.testing.assert_allclose(data, np.abs(M), rtol=0, atol=tol * max(1.0, float(np.abs(M).max())))


def assert_display_rules(drawn, vmax):
    clims = {p.image.get_clim() for p in drawn.panels}
    assert clims == {(0.0, vmax)}, "one shared white level, vmin = 0"
    for p in drawn.panels:
        assert p.image.get_cmap().name == "gray"
        assert np.isfinite(p.image.get_array()).all(), "no NaN in any panel"


# ------------------------------------------------------------ the study
def test_study_matches_core(net, study):
    model, X, y = net
    torch.testing.assert_close(study.F, kl.exact_fisher(model, X, "categorical", layers=LAYERS))
    fac = kl.kronecker_factors(model, X, "categorical", layers=LAYERS)
    torch.testing.assert_close(study.F_tilde, fac.dense())
    # ∇h in the paper layout
    m64 = tanh_net([64, 8, 8, 8, 8, 10])
    m64.load_state_dict(model.state_dict())
    m64 = m64.double()
    nn.functional.cross_entropy(m64(X.double()), y).backward()
    g = kl.mats_to_vec(kl.NetworkView(m64).gradient_matrices(LAYERS))
    torch.testing.assert_close(study.grad, g)
    assert study.n_params == 3 * 8 * 9 and study.labels == ["W2", "W3", "W4"]


def test_gamma_dependent_pieces(study):
    g = 0.02
    damped = study.factors.damped(g).dense()
    P = study.n_params
    # F̃ with its diagonal blocks replaced equals the kron of every damped block pair, also on a sub-study
    torch.testing.assert_close(study.F_tilde_damped(g), damped, rtol=0, atol=1e-15)
    sub = study.subset([LAYERS[0], LAYERS[-1]])
    torch.testing.assert_close(sub.F_tilde_damped(g), study.factors.damped(g).dense(sub.layers), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        study.F_tilde_inverse(g) @ damped, torch.eye(P, dtype=torch.float64), atol=1e-8, rtol=0
    )
    op = kl.block_tridiagonal_inverse(study.factors, g)
    torch.testing.assert_close(study.tridiag_inverse(g), op.dense(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        study.blockdiag_inverse(g), kl.block_diagonal_inverse(study.factors, g).dense()
    )
    # memoised per γ, and the cache is bounded
    assert study.F_tilde_inverse(g) is study.F_tilde_inverse(g)
    for gg in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        study.blockdiag_operator(gg)
    assert len(study._gamma_cache) <= study.cache_size


def test_natural_gradients(study):
    g = 0.05
    ref = torch.linalg.solve(study.F + g**2 * torch.eye(study.n_params, dtype=torch.float64), study.grad)
    torch.testing.assert_close(study.exact_natural_gradient(g), ref, rtol=1e-8, atol=1e-10)
    dirs = study.natural_gradients(g)
    assert set(dirs) == {"F̆⁻¹∇h", "F̂⁻¹∇h", "F̃⁻¹∇h"}
    torch.testing.assert_close(dirs["F̂⁻¹∇h"], study.tridiag_inverse(g) @ study.grad)
    cos = study.direction_table(g).set_index("direction")["cosine"]
    assert ((cos > -1) & (cos <= 1 + 1e-12)).all()
    # heavy damping: every direction → ∇h/γ², so all agree with the exact one
    assert (study.direction_table(1e3)["cosine"] > 0.999).all()
    m = study.damping_metrics(g)
    assert list(m.columns) == [
        "gamma",
        "rel_error_overall",
        "rel_error_diagonal",
        "cosine_vs_exact_ng",
        "cosine_vs_F_tilde_ng",
    ]
    assert m.loc["F̃⁻¹ (damped F̃, exact inverse)", "rel_error_overall"] == 0.0
    assert m.loc["F̃⁻¹ (damped F̃, exact inverse)", "cosine_vs_F_tilde_ng"] == pytest.approx(1.0)
    # F̂⁻¹∇h is closer to F̃⁻¹∇h than F̆⁻¹∇h is
    assert (
        m.loc["F̂⁻¹ (block-tridiagonal)", "cosine_vs_F_tilde_ng"]
        > m.loc["F̆⁻¹ (block-diagonal)", "cosine_vs_F_tilde_ng"]
    )


def test_study_without_targets(net):
    model, X, _ = net
    st = CurvatureStudy(model, X, None, layers=[1, 2])
    assert st.grad is None
    assert st.damping_metrics(0.1)["cosine_vs_exact_ng"].isna().all()
    with pytest.raises(ValueError, match="y="):
        st.natural_gradients(0.1)


def test_subset_shares_the_precomputation(net, study):
    model, X, _y = net
    sub = study.subset([1, 3])
    assert sub is study.subset([1, 3]) and study.subset(LAYERS) is study
    torch.testing.assert_close(sub.F, kl.exact_fisher(model, X, "categorical", layers=[1, 3]))
    torch.testing.assert_close(
        sub.F_tilde, kl.kronecker_factors(model, X, "categorical", layers=[1, 3]).dense()
    )
    assert sub.labels == ["W2", "W4"] and sub.grad.shape == (sub.n_params,)
    sub.F_tilde_inverse(0.1)  # its own γ cache works


# ------------------------------------------------------------ Figure 5
def test_figure5(study):
    drawn = kf.figure5(study)
    fig, df = drawn
    # 6 comparison panels + the zoom of |F̃ − F̂| + the text axes beside it (colourbars are insets)
    assert isinstance(fig, Figure) and len(fig.axes) == 8 and len(drawn.panels) == 6
    assert {
        "comparison",
        "block_row",
        "block_col",
        "kind",
        "rel_error",
        "exact_by_construction",
        "reproduced",
        "gamma",
        "vmax",
    } <= set(df.columns)
    assert df.attrs["gamma"] == 0.0 and not df.attrs["gamma_fallback"]
    vmax = df.attrs["vmax"]
    assert (df["vmax"] == vmax).all() and drawn.meta["vmax"] == vmax and vmax > 0
    assert_display_rules(drawn, vmax)
    Ft = study.F_tilde
    mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.float64) for s in study.sizes])
    F_breve = Ft * mask
    F_hat = torch.linalg.inv(kl.block_tridiagonal_inverse(study.factors, 0.0).dense())
    data = panel_data(drawn)
    for i, M in enumerate([Ft, F_breve, Ft - F_breve, Ft, F_hat, Ft - F_hat]):
        assert_abs_equal(data[i], M, tol=1e-9)
    # F̆ keeps the diagonal blocks exactly, F̂ the tridiagonal ones (to rounding)
    hat = df[df.comparison.str.startswith("F̂")]
    assert hat[hat.kind.isin(["diagonal", "tridiagonal"])]["rel_error"].max() < 1e-8
    assert df.loc[df.exact_by_construction, "reproduced"].all()
    breve = df[df.comparison.str.startswith("F̆")]
    assert (breve[breve.kind == "diagonal"]["rel_error"] == 0).all()
    # the paper's point: F̂ approximates the off-tridiagonal blocks well too (F̆ puts zeros there)
    assert hat[hat.kind == "off-tridiagonal"]["rel_error"].max() < 0.5
    assert (breve[breve.kind == "off-tridiagonal"]["rel_error"] == 1).all()


def test_figure5_zoom_shows_the_off_tridiagonal_error_at_its_own_level(study):
    drawn = kf.figure5(study)
    fig, df = drawn
    zoom = drawn.zoom_panel
    F_hat = study.tridiag_approximation(0.0)
    D = study.F_tilde - F_hat
    assert_abs_equal(zoom.image.get_array().data, D, tol=1e-12)
    # its white level: the 99.5th percentile of the off-tridiagonal blocks (|i − j| ≥ 2) of |F̃ − F̂|
    s = study.sizes
    off = D[: s[0], s[0] + s[1]:]  # with three layers the only off-tridiagonal blocks: (W2, W4), (W4, W2)
    zv = kf.shared_vmax([torch.cat([off.reshape(-1), off.T.reshape(-1)])])
    assert df.attrs["zoom_vmax"] == pytest.approx(zv) and (df["zoom_vmax"] == df.attrs["zoom_vmax"]).all()
    assert zoom.image.get_clim() == (0.0, df.attrs["zoom_vmax"])
    # far finer than the shared level, at which the same panel is (nearly) all black
    assert df.attrs["zoom_vmax"] < 0.5 * df.attrs["vmax"]
    assert float(np.percentile(zoom.data[: s[0], s[0] + s[1]:], 50)) > 0.05 * df.attrs["zoom_vmax"]
    assert kf.fmt_level(df.attrs["zoom_vmax"]) in zoom.ax.get_title()
    assert kf.fmt_level(df.attrs["zoom_vmax"]) in fig._suptitle.get_text()
    # the notes beside it quote F̂'s relative error on that block, from the DataFrame
    hat = df[df.comparison.str.startswith("F̂") & (df.kind == "off-tridiagonal")]
    notes = "".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert f"{hat['rel_error'].iloc[0]:.1%}" in notes


def test_figure5_falls_back_to_a_tiny_gamma_when_singular():
    X, y = digits(5)  # 5 cases: the 9×9 Ā factors have rank ≤ 6
    model = tanh_net([64, 8, 8, 8, 10])
    st = CurvatureStudy(model, X, y, layers=[1, 2])
    drawn = kf.figure5(st)
    fig, df = drawn
    assert df.attrs["gamma_fallback"] and df.attrs["gamma"] > 0
    assert "fallback" in fig._suptitle.get_text()
    assert all(np.isfinite(d).all() for d in panel_data(drawn))


# ------------------------------------------------------------ Figure 6
@pytest.mark.parametrize("gamma", [1e-3, 3e-2])
def test_figure6(study, gamma):
    drawn = kf.figure6(study, gamma)
    fig, df = drawn
    assert len(fig.axes) == 6
    assert {"comparison", "kind", "rel_error", "gamma", "vmax"} <= set(df.columns)
    vmax = df.attrs["vmax"]
    assert_display_rules(drawn, vmax)
    ref = torch.linalg.inv(study.factors.damped(gamma).dense())  # F̃⁻¹ = inverse of the DAMPED F̃
    breve = kl.block_diagonal_inverse(study.factors, gamma).dense()
    hat = kl.block_tridiagonal_inverse(study.factors, gamma).dense()
    data = panel_data(drawn)
    for i, M in enumerate([ref, breve, ref - breve, ref, hat, ref - hat]):
        assert_abs_equal(data[i], M, tol=1e-8)
    err = df.set_index(["comparison", "kind"])["rel_error"]
    for kind in ("overall", "diagonal"):  # Appendix C: F̂⁻¹ is better, even on the diagonal blocks
        assert err["F̂⁻¹ (block-tridiagonal)", kind] < err["F̆⁻¹ (block-diagonal)", kind]
    assert err["F̆⁻¹ (block-diagonal)", "tridiagonal"] == pytest.approx(1.0)
    assert f"{gamma:.3g}" in fig._suptitle.get_text()


def test_figure6_singular_at_zero_gamma_raises_clearly():
    X, y = digits(5)
    st = CurvatureStudy(tanh_net([64, 8, 8, 8, 10]), X, y, layers=[1, 2])
    with pytest.raises(kl.SingularFactorError, match="gamma"):
        kf.figure6(st, 0.0)


# ------------------------------------------------------------ companions
def test_figure_exact_vs_kfac(study):
    drawn = kf.figure_exact_vs_kfac(study)
    fig, df = drawn
    assert len(fig.axes) == 3
    assert {"comparison", "block_row", "block_col", "kind", "rel_error", "vmax"} <= set(df.columns)
    assert_display_rules(drawn, df.attrs["vmax"])
    for d, M in zip(panel_data(drawn), [study.F, study.F_tilde, study.F - study.F_tilde]):
        assert_abs_equal(d, M)
    # block boundaries: one line per inner edge and axis, ticks named after the layers
    ax = drawn.panels[0].ax
    assert len(drawn.panels[0].lines) == 2 * (len(LAYERS) - 1)
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == ["W2", "W3", "W4"]


def test_figure_inverse_structure(study):
    drawn = kf.figure_inverse_structure(study, 0.01)
    fig, df = drawn
    assert len(fig.axes) == 2
    assert list(df["matrix"]) == ["F̃", "F̃ (damped)", "F̃⁻¹ (damped F̃)"]
    cols = ["diagonal_mass", "neighbour_mass", "off_tridiagonal_mass"]
    np.testing.assert_allclose(df[cols].sum(axis=1), 1.0)
    assert ((df["within_tridiagonal_mass"] >= 0) & (df["within_tridiagonal_mass"] <= 1)).all()
    inv = df.iloc[2]
    assert inv["tridiag_truncation_error"] < inv["blockdiag_truncation_error"]
    # the title states what the numbers show, computed from them (not a fixed claim)
    title = fig._suptitle.get_text()
    assert "nearly block-tridiagonal" not in title
    assert kf.percent(inv["diagonal_mass"]) in title
    assert kf.percent(inv["neighbour_share_of_off_diagonal"]) in title
    assert kf.percent(neighbour_share_chance(study.sizes)) in title and "chance" in title
    assert kf.percent(df.iloc[0]["neighbour_share_of_off_diagonal"]) in title
    np.testing.assert_allclose(df["neighbour_share_chance"], 2 / 3)  # 3 equal blocks: 4 of 6 pairs
    assert_abs_equal(panel_data(drawn)[1], study.F_tilde_inverse(0.01), tol=1e-10)
    assert all(np.isfinite(d).all() for d in panel_data(drawn))


def test_figure_cumulants(net, study):
    model, X, _y = net
    drawn = kf.figure_cumulants(model, X, "categorical", 1, 2)
    fig, df = drawn
    assert len(fig.axes) == 5
    assert {"term", "frobenius", "relative_to_difference", "vmax"} <= set(df.columns)
    terms = kl.cumulant_terms(model, X, "categorical", 1, 2)
    names = ["difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3", "residual"]
    for d, name in zip(panel_data(drawn), names):
        assert_abs_equal(d, terms.as_block(name))
    assert_display_rules(drawn, df.attrs["vmax"])
    assert df.set_index("term").loc["residual", "relative_to_difference"] < 1e-8
    # F − F̃ panel is that block of F − F̃
    sl = kl.NetworkView(model).block_slices(LAYERS)
    assert_abs_equal(panel_data(drawn)[0], (study.F - study.F_tilde)[sl[0], sl[1]], tol=1e-10)
    # a study can stand in for (model, X, likelihood), using its cache
    _fig2, df2 = kf.figure_cumulants(study, None, None, 1, 2)
    np.testing.assert_allclose(df2["frobenius"], df["frobenius"])


def test_figure_training_curves():
    it = np.arange(1, 21)
    h1 = pd.DataFrame({"iteration": it, "time": it * 0.1, "loss": 1.0 / it})
    h2 = pd.DataFrame({"iteration": it, "time": it * 0.3, "loss": 2.0 / it})
    drawn = kf.figure_training_curves({"kfac": h1, "sgd": h2})
    fig, df = drawn
    assert len(fig.axes) == 2 and all(ax.get_yscale() == "log" for ax in fig.axes)
    assert len(fig.axes[0].lines) == 2 and set(df["run"]) == {"kfac", "sgd"}
    np.testing.assert_allclose(fig.axes[1].lines[1].get_xdata(), h2["time"])
    drawn = kf.figure_training_curves({"kfac": h1.assign(error=0.5 / it)})
    fig, _ = drawn
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="time"):
        kf.figure_training_curves({"bad": h1.drop(columns="time")})


def test_training_curves_have_a_cases_axis_and_define_the_error():
    it = np.arange(1, 21)
    h1 = pd.DataFrame({"iteration": it, "time": it * 0.1, "loss": 1.0 / it,
                       "batch_size": np.minimum(10 * it, 100), "error": np.where(it % 5 == 0, 0.5 / it, np.nan)})
    h2 = pd.DataFrame({"iteration": it, "time": it * 0.3, "loss": 2.0 / it, "batch_size": 50,
                       "error": np.where(it % 10 == 0, 1.0 / it, np.nan)})
    drawn = kf.figure_training_curves({"kfac": h1, "sgd": h2}, network="autoencoder 64-8-64",
                                      data="digits", preset="quick", likelihood="bernoulli")
    fig, df = drawn
    assert len(fig.axes) == 6  # 2 rows (loss, error) × 3 columns (iteration, cases processed, time)
    xlabels = [ax.get_xlabel() for ax in fig.axes]
    assert sum("cases processed" in x for x in xlabels) == 2
    cases_ax = next(ax for ax in fig.axes if "cases processed" in ax.get_xlabel())
    # x = cumulative mini-batch sizes, counted over every iteration (not only the evaluated ones)
    np.testing.assert_allclose(cases_ax.lines[0].get_xdata(), np.cumsum(h1["batch_size"]))
    np.testing.assert_allclose(cases_ax.lines[1].get_xdata(), 50 * it)
    err_cases_ax = [ax for ax in fig.axes if "cases processed" in ax.get_xlabel()][1]
    ok = h1["error"].notna()
    np.testing.assert_allclose(err_cases_ax.lines[0].get_xdata(), np.cumsum(h1["batch_size"])[ok])
    np.testing.assert_allclose(err_cases_ax.lines[0].get_ydata(), h1["error"][ok])
    assert "cases_processed" in df.columns
    title = fig._suptitle.get_text()
    for word in ("autoencoder 64-8-64", "digits", "quick", "loss:", "error:", "squared reconstruction error"):
        assert word in title
    assert any("squared reconstruction error" in ax.get_ylabel() for ax in fig.axes)
    assert drawn.meta["error_definition"][0] == "squared reconstruction error per case"
    # the CLI's labels for the zoo comparison name the network, data and preset
    kw = kf.training_comparison_labels("quick", "mnist")
    assert kw["network"] == "autoencoder 784-250-100-30-100-250-784" and kw["likelihood"] == "bernoulli"
    assert kw["preset"] == "quick" and "MNIST" in kw["data"] and kw["note"] is None
    # a run cut short of the preset's iterations says so in the title
    assert kf.training_comparison_labels("quick", "mnist", 150)["note"] is None
    cut = kf.training_comparison_labels("paper", "mnist", 40)
    assert cut["note"] == "K-FAC run for 40 of the preset's 500 iterations"
    assert cut["note"] in kf.figure_training_curves({"run": h1}, **cut).figure._suptitle.get_text()


# ------------------------------------------------------------ Figure 7 display
F7_VARIANTS = ("re-scaled, momentum", "re-scaled, no momentum", "raw Δ (no re-scaling)")


def _figure7_frame():
    gammas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    imp = {
        "re-scaled, momentum": [7e-4, 0.19, 0.15, 0.1, 0.05],
        "re-scaled, no momentum": [6.5e-6, 0.11, 0.07, 0.04, 0.03],
        "raw Δ (no re-scaling)": [-7.1e6, -52.6, -8.3, -0.63, 0.015],
    }
    return pd.DataFrame([{"gamma": g, "variant": v, "improvement": y}
                         for v in F7_VARIANTS for g, y in zip(gammas, imp[v])])


def _legend_outside(fig, ax):
    fig.draw_without_rendering()
    leg = ax.get_legend()
    assert leg is not None
    lb, ab = leg.get_window_extent(), ax.get_window_extent()
    # no overlap with the axes' box: entirely right of, left of, above or below it
    return lb.x0 >= ab.x1 or lb.x1 <= ab.x0 or lb.y0 >= ab.y1 or lb.y1 <= ab.y0


def test_draw_figure7_plots_every_point_at_its_value_on_symlog():
    df = _figure7_frame()
    fig = Figure(figsize=(8.6, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    lines = kf.draw_figure7(ax, df, chosen_gamma=1e-2)
    assert ax.get_yscale() == "symlog" and ax.get_xscale() == "log"
    # linthresh from the data: the smallest positive improvement of the re-scaled curves
    assert ax.yaxis.get_transform().linthresh == pytest.approx(6.5e-6) == kf.figure7_linthresh(df)
    for v in F7_VARIANTS:
        d = df[df.variant == v].sort_values("gamma")
        np.testing.assert_array_equal(lines[v].get_xdata(), d["gamma"].to_numpy())
        np.testing.assert_array_equal(lines[v].get_ydata(), d["improvement"].to_numpy())  # nothing clipped
    lo, hi = ax.get_ylim()
    assert lo <= df["improvement"].min() and hi >= df["improvement"].max()  # every point inside the view
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("below the axis" in t for t in labels)  # no clipping markers any more
    assert sum("γ chosen by K-FAC" in t for t in labels) == 1
    star = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [1e-2]
    assert all(ln.get_marker() != "v" for ln in ax.lines)
    assert _legend_outside(fig, ax)


def test_figure7_symlog_legend_outside_and_values_on_a_tiny_autoencoder():
    from kfac_lens import zoo
    from kfac_lens.optim import KFAC, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X = digits(120)[0]
        model = zoo.sparse_init_(zoo.autoencoder_net([64, 16, 4, 16, 64]), seed=0)
        opt = KFAC(model, "bernoulli", "tridiag", seed=0)
        train(model, opt, X, X, 4, batch_size=120, progress=False)
        gammas = [1e-8, 1e-3, 1e-1, 10.0]  # float32 K-FAC refuses γ = 1e-8 (and even float64 does)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "nearly singular" at γ = 1e-3
            drawn = kf.figure7(opt, X, X, gammas)
            fig, df = drawn
            _, df32 = kf.figure7(opt, X, X, gammas, dtype=None)
    finally:
        torch.set_num_threads(threads)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and ax.get_yscale() == "symlog"
    for v in F7_VARIANTS:
        d = df[df.variant == v].sort_values("gamma")
        line = next(ln for ln in ax.lines if ln.get_label() == v)
        np.testing.assert_array_equal(line.get_ydata(), d["improvement"].to_numpy())  # NaN where refused
    assert _legend_outside(fig, ax)
    # "auto": refused in float32, so the sweep ran in float64 on a copy; the title says so
    assert set(df["dtype"]) == {"float64"} and "float64" in ax.get_title()
    assert opt.view.dtype == torch.float32 and set(df32["dtype"]) == {"float32"}
    ok = df["refused"].isna()
    assert df.loc[ok, "improvement"].notna().all() and set(df.loc[~ok, "gamma"]) == {1e-8}
    assert set(df32.loc[df32["refused"].notna(), "gamma"]) == {1e-8}
    both = df.merge(df32, on=["gamma", "variant"], suffixes=("", "_32"))
    both = both[both["gamma"] > 1e-8]
    np.testing.assert_allclose(both["improvement"], both["improvement_32"], rtol=1e-3, atol=1e-5)
    # a γ without a value is shown as a shaded band and named in the legend, not silently dropped
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("refuses" in t for t in labels)


# ------------------------------------------------------------ colourbars and white levels
@pytest.mark.parametrize("which", ["figure5", "figure6", "exact", "inverse", "cumulants"])
def test_every_matrix_panel_has_a_colorbar_and_a_stated_white_level(net, study, which):
    model, X, _y = net
    drawn = {
        "figure5": lambda: kf.figure5(study),
        "figure6": lambda: kf.figure6(study, 0.01),
        "exact": lambda: kf.figure_exact_vs_kfac(study),
        "inverse": lambda: kf.figure_inverse_structure(study, 0.01),
        "cumulants": lambda: kf.figure_cumulants(model, X, "categorical", 1, 2),
    }[which]()
    fig, df = drawn
    panels = drawn.matrix_panels
    assert set(map(id, drawn.panels)) <= set(map(id, panels))
    # every image in the figure belongs to one of these panels
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert {id(im) for im in images} == {id(p.image) for p in panels}
    suptitle = fig._suptitle.get_text()
    for p in panels:
        white = p.image.get_clim()[1]
        assert p.colorbar is not None and p.colorbar.mappable is p.image
        assert p.colorbar.vmin == 0.0 and p.colorbar.vmax == pytest.approx(white)
        assert kf.fmt_level(white) in p.ax.get_title() or kf.fmt_level(white) in suptitle
        # the colourbar sits right of its panel, outside it
        fig.draw_without_rendering()
        assert p.colorbar.ax.get_window_extent().x0 >= p.ax.get_window_extent().x1


# ------------------------------------------------------------ helpers
def test_percentile_is_numpys_to_the_bit():
    """The white level's percentile (one partition) equals np.percentile's linear interpolation exactly, on
    random magnitudes, sizes (1 included) and quantiles, so no committed white level moves."""
    from kfac_lens.figures.panels import percentile

    rng = np.random.default_rng(7)
    for _ in range(200):
        x = np.abs(rng.standard_normal(int(rng.integers(1, 5000)))) * 10.0 ** int(rng.integers(-9, 9))
        for q in (0.0, 12.5, 50.0, 99.5, 100.0):
            assert percentile(x, q) == float(np.percentile(x, q))


def test_shared_vmax_and_pooling():
    a = np.arange(1000.0).reshape(10, 100)
    assert kf.shared_vmax([a, -a]) == pytest.approx(np.percentile(np.abs(a), 99.5))
    assert kf.shared_vmax([np.zeros((3, 3))]) == 1.0
    sparse = np.zeros((100, 100))
    sparse[0, 0] = 5.0
    assert kf.shared_vmax([sparse]) == 5.0  # quantile 0 → largest entry, never an all-black panel
    x = np.arange(25.0).reshape(5, 5)
    pooled = kf.mean_pool(x, 2)
    assert pooled.shape == (3, 3)
    assert pooled[0, 0] == pytest.approx(x[:2, :2].mean()) and pooled[2, 2] == x[4, 4]
    assert pooled[0, 2] == pytest.approx(x[:2, 4].mean())
    fig = Figure()
    p = kf.MatrixPanel(fig.add_subplot(), "t", max_pixels=10)
    M = np.random.default_rng(0).standard_normal((45, 45))
    p.show(M, 1.0, [20, 25], ["W1", "W2"])
    assert p.pool == 4 and p.image.get_array().shape == (12, 12)
    np.testing.assert_array_equal(p.data, np.abs(M))
    with pytest.raises(ValueError, match="NaN"):
        p.show(np.full((3, 3), np.nan), 1.0)


def test_save_figure(tmp_path, study):
    drawn = kf.figure_exact_vs_kfac(study)
    fig, _ = drawn
    path = kf.save_figure(fig, tmp_path / "deep" / "dir" / "fig.png", dpi=50)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    w, h = fig.get_size_inches() * 50
    assert abs(img.shape[1] - w) <= 1 and abs(img.shape[0] - h) <= 1
