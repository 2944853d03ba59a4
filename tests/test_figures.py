"""Tests for kfac_lens.figures: panels show exactly the intended matrices, by the paper's display rules."""

from __future__ import annotations


import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import kfac_lens as kl
from kfac_lens import figures as kf
from kfac_lens.figures import CurvatureStudy
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


def panel_data(fig):
    return [p.image.get_array().data for p in fig.kfac_panels]


def assert_abs_equal(data, M, tol=1e-12):
    M = M.detach().double().numpy() if isinstance(M, torch.Tensor) else M
    assert data.shape == M.shape
    np.testing.assert_allclose(data, np.abs(M), rtol=0, atol=tol * max(1.0, float(np.abs(M).max())))


def assert_display_rules(fig, vmax):
    clims = {p.image.get_clim() for p in fig.kfac_panels}
    assert clims == {(0.0, vmax)}, "one shared white level, vmin = 0"
    for p in fig.kfac_panels:
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
    fig, df = kf.figure5(study)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
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
    assert (df["vmax"] == vmax).all() and fig.kfac_lens["vmax"] == vmax and vmax > 0
    assert_display_rules(fig, vmax)
    Ft = study.F_tilde
    mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.float64) for s in study.sizes])
    F_breve = Ft * mask
    F_hat = torch.linalg.inv(kl.block_tridiagonal_inverse(study.factors, 0.0).dense())
    data = panel_data(fig)
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


def test_figure5_falls_back_to_a_tiny_gamma_when_singular():
    X, y = digits(5)  # 5 cases: the 9×9 Ā factors have rank ≤ 6
    model = tanh_net([64, 8, 8, 8, 10])
    st = CurvatureStudy(model, X, y, layers=[1, 2])
    fig, df = kf.figure5(st)
    assert df.attrs["gamma_fallback"] and df.attrs["gamma"] > 0
    assert "fallback" in fig._suptitle.get_text()
    assert all(np.isfinite(d).all() for d in panel_data(fig))


# ------------------------------------------------------------ Figure 6
@pytest.mark.parametrize("gamma", [1e-3, 3e-2])
def test_figure6(study, gamma):
    fig, df = kf.figure6(study, gamma)
    assert len(fig.axes) == 6
    assert {"comparison", "kind", "rel_error", "gamma", "vmax"} <= set(df.columns)
    vmax = df.attrs["vmax"]
    assert_display_rules(fig, vmax)
    ref = torch.linalg.inv(study.factors.damped(gamma).dense())  # F̃⁻¹ = inverse of the DAMPED F̃
    breve = kl.block_diagonal_inverse(study.factors, gamma).dense()
    hat = kl.block_tridiagonal_inverse(study.factors, gamma).dense()
    data = panel_data(fig)
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
    fig, df = kf.figure_exact_vs_kfac(study)
    assert len(fig.axes) == 3
    assert {"comparison", "block_row", "block_col", "kind", "rel_error", "vmax"} <= set(df.columns)
    assert_display_rules(fig, df.attrs["vmax"])
    for d, M in zip(panel_data(fig), [study.F, study.F_tilde, study.F - study.F_tilde]):
        assert_abs_equal(d, M)
    # block boundaries: one line per inner edge and axis, ticks named after the layers
    ax = fig.kfac_panels[0].ax
    assert len(fig.kfac_panels[0].lines) == 2 * (len(LAYERS) - 1)
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == ["W2", "W3", "W4"]


def test_figure_inverse_structure(study):
    fig, df = kf.figure_inverse_structure(study, 0.01)
    assert len(fig.axes) == 2
    assert list(df["matrix"]) == ["F̃", "F̃ (damped)", "F̃⁻¹ (damped F̃)"]
    cols = ["diagonal_mass", "neighbour_mass", "off_tridiagonal_mass"]
    np.testing.assert_allclose(df[cols].sum(axis=1), 1.0)
    assert ((df["within_tridiagonal_mass"] >= 0) & (df["within_tridiagonal_mass"] <= 1)).all()
    inv = df.iloc[2]
    assert inv["tridiag_truncation_error"] < inv["blockdiag_truncation_error"]
    assert_abs_equal(panel_data(fig)[1], study.F_tilde_inverse(0.01), tol=1e-10)
    assert all(np.isfinite(d).all() for d in panel_data(fig))


def test_figure_cumulants(net, study):
    model, X, _y = net
    fig, df = kf.figure_cumulants(model, X, "categorical", 1, 2)
    assert len(fig.axes) == 5
    assert {"term", "frobenius", "relative_to_difference", "vmax"} <= set(df.columns)
    terms = kl.cumulant_terms(model, X, "categorical", 1, 2)
    names = ["difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3", "residual"]
    for d, name in zip(panel_data(fig), names):
        assert_abs_equal(d, terms.as_block(name))
    assert_display_rules(fig, df.attrs["vmax"])
    assert df.set_index("term").loc["residual", "relative_to_difference"] < 1e-8
    # F − F̃ panel is that block of F − F̃
    sl = kl.NetworkView(model).block_slices(LAYERS)
    assert_abs_equal(panel_data(fig)[0], (study.F - study.F_tilde)[sl[0], sl[1]], tol=1e-10)
    # a study can stand in for (model, X, likelihood), using its cache
    _fig2, df2 = kf.figure_cumulants(study, None, None, 1, 2)
    np.testing.assert_allclose(df2["frobenius"], df["frobenius"])


def test_figure_training_curves():
    it = np.arange(1, 21)
    h1 = pd.DataFrame({"iteration": it, "time": it * 0.1, "loss": 1.0 / it})
    h2 = pd.DataFrame({"iteration": it, "time": it * 0.3, "loss": 2.0 / it})
    fig, df = kf.figure_training_curves({"kfac": h1, "sgd": h2})
    assert len(fig.axes) == 2 and all(ax.get_yscale() == "log" for ax in fig.axes)
    assert len(fig.axes[0].lines) == 2 and set(df["run"]) == {"kfac", "sgd"}
    np.testing.assert_allclose(fig.axes[1].lines[1].get_xdata(), h2["time"])
    fig, _ = kf.figure_training_curves({"kfac": h1.assign(error=0.5 / it)})
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="time"):
        kf.figure_training_curves({"bad": h1.drop(columns="time")})


# ------------------------------------------------------------ helpers
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
    fig, _ = kf.figure_exact_vs_kfac(study)
    path = kf.save_figure(fig, tmp_path / "deep" / "dir" / "fig.png", dpi=50)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    w, h = fig.get_size_inches() * 50
    assert abs(img.shape[1] - w) <= 1 and abs(img.shape[0] - h) <= 1
