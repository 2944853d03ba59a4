"""Tests for kfac_lens.widgets, driving the callbacks programmatically (no browser; docs/testing.md, "Widgets")."""

from __future__ import annotations


import ipywidgets as W
import numpy as np
import pytest
import torch

import kfac_lens as kl
from kfac_lens import figures as kf
from kfac_lens.study import CurvatureStudy
from digits_nets import digits, trained_net
from kfac_lens.widgets import DampingExplorer, FisherExplorer, figure_png

pytestmark = pytest.mark.usefixtures("agg_backend")

LAYERS = [1, 2, 3]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def net():
    return trained_net(steps=100, n=300)


@pytest.fixture(scope="module")
def study(net):
    model, X, y = net
    return CurvatureStudy(model, X, y, "categorical", layers=LAYERS, name="tiny")


def shown(panel):
    return panel.image.get_array().data


def assert_abs_equal(data, M, tol=1e-9):
    M = M.detach().double().numpy()
    assert data.shape == M.shape
    np.testing.assert_allclose(data, np.abs(M), rtol=0, atol=tol * max(1.0, float(np.abs(M).max())))


# ------------------------------------------------------------ DampingExplorer
def test_damping_explorer_gamma_slider(study):
    ex = DampingExplorer(study, gamma=1e-2)
    assert isinstance(ex.widget, W.VBox) and hasattr(ex, "_ipython_display_")
    assert isinstance(ex.gamma_slider, W.FloatLogSlider) and ex.gamma_slider.description == "γ"
    png0, table0, metrics0 = bytes(ex.image.value), ex.table.value, ex.metrics.copy()
    assert png0.startswith(PNG) and "<table" in table0
    assert_abs_equal(shown(ex.panels[1][1]), study.tridiag_inverse(1e-2))

    ex.gamma_slider.value = 0.1  # fires the observer synchronously
    g = ex.gamma
    hat = kl.block_tridiagonal_inverse(study.factors, g).dense()
    breve = kl.block_diagonal_inverse(study.factors, g).dense()
    ref = torch.linalg.inv(study.factors.damped(g).dense())
    assert_abs_equal(shown(ex.panels[1][1]), hat)
    assert_abs_equal(shown(ex.panels[0][1]), breve)
    assert_abs_equal(shown(ex.panels[0][0]), ref, tol=1e-8)
    assert_abs_equal(shown(ex.panels[1][2]), ref - hat, tol=1e-8)
    clims = {p.image.get_clim() for row in ex.panels for p in row}
    assert clims == {(0.0, ex.vmax)}
    assert ex.vmax == pytest.approx(kf.figure6(study, g)[1].attrs["vmax"])  # Figure 6's white level
    assert bytes(ex.image.value) != png0 and bytes(ex.image.value).startswith(PNG)
    assert ex.table.value != table0
    assert (ex.metrics["gamma"] == g).all() and not ex.metrics.equals(metrics0)
    assert list(ex.metrics.columns) == [
        "gamma",
        "rel_error_overall",
        "rel_error_diagonal",
        "cosine_vs_exact_ng",
        "cosine_vs_F_tilde_ng",
    ]
    tri = ex.metrics.loc["F̂⁻¹ (block-tridiagonal)"]
    diag = ex.metrics.loc["F̆⁻¹ (block-diagonal)"]
    assert tri["rel_error_overall"] < diag["rel_error_overall"]
    # cosine with the exact (F + γ²I)⁻¹∇h
    exact = torch.linalg.solve(study.F + g**2 * torch.eye(study.n_params, dtype=torch.float64), study.grad)
    u = hat @ study.grad
    assert tri["cosine_vs_exact_ng"] == pytest.approx(float(u @ exact / (u.norm() * exact.norm())), rel=1e-8)
    assert set(ex.timings) >= {"compute_s", "render_s", "total_s"}


def test_damping_explorer_set_gamma_widens_the_range(study):
    ex = DampingExplorer(study, gamma=1e-2, gamma_range=(1e-3, 1.0))
    ex.set_gamma(30.0)
    assert ex.gamma == pytest.approx(30.0) and ex.gamma_slider.max >= np.log10(30.0)
    assert_abs_equal(shown(ex.panels[1][1]), kl.block_tridiagonal_inverse(study.factors, ex.gamma).dense())


def test_damping_explorer_inverse_choice(study):
    ex = DampingExplorer(study, gamma=0.05)
    g, png = ex.gamma, bytes(ex.image.value)
    h_both = ex.fig.get_size_inches()[1]
    ex.inverse_choice.value = "block-tridiagonal"
    assert_abs_equal(shown(ex.panels[0][1]), study.tridiag_inverse(g))
    assert not any(p.ax.get_visible() for p in ex.panels[1])
    assert ex.fig.get_size_inches()[1] < h_both and bytes(ex.image.value) != png
    ex.inverse_choice.value = "block-diagonal"
    assert_abs_equal(shown(ex.panels[0][1]), study.blockdiag_inverse(g))
    ex.inverse_choice.value = "both"
    assert all(p.ax.get_visible() for row in ex.panels for p in row)
    assert ex.fig.get_size_inches()[1] == pytest.approx(h_both)


def test_damping_explorer_layer_subset(net, study):
    model, X, _ = net
    ex = DampingExplorer(study, gamma=0.05)
    png = bytes(ex.image.value)
    ex.layer_select.value = (1, 2)
    fac = kl.kronecker_factors(model, X, "categorical", layers=[1, 2])
    hat = kl.block_tridiagonal_inverse(fac, 0.05).dense()
    assert shown(ex.panels[1][1]).shape == (144, 144)
    assert_abs_equal(shown(ex.panels[1][1]), hat)
    assert len(ex.panels[1][1].lines) == 2  # one inner block edge per axis
    assert bytes(ex.image.value) != png
    ex.layer_select.value = ()  # nothing selected: a message, no exception
    assert "at least one layer" in ex.status.value


def test_damping_explorer_reports_singular_gamma():
    X, y = digits(5)  # 5 cases: singular factors, so γ → 0 cannot be inverted
    model, *_ = trained_net(steps=1)
    st = CurvatureStudy(model, X, y, layers=[1, 2])
    ex = DampingExplorer(st, gamma=0.1, gamma_range=(1e-30, 10.0))
    png = bytes(ex.image.value)
    assert png.startswith(PNG) and "update" in ex.status.value
    ex.gamma_slider.value = 1e-30
    assert "γ" in ex.status.value and bytes(ex.image.value) == png  # message; the last good picture stays


def test_figure_png_is_a_png(study):
    ex = DampingExplorer(study)
    assert figure_png(ex.fig, dpi=30).startswith(PNG)


# ------------------------------------------------------------ FisherExplorer
def test_fisher_explorer_block_pick(net, study):
    model, X, _ = net
    ex = FisherExplorer(study)
    assert isinstance(ex.widget, W.VBox) and hasattr(ex, "_ipython_display_")
    for p, M in zip(ex.panels, [study.F, study.F_tilde, study.F - study.F_tilde]):
        assert_abs_equal(shown(p), M)
    assert ex.block == (1, 2)
    png, cpng, table = bytes(ex.image.value), bytes(ex.cumulant_image.value), ex.table.value
    ex.col_dropdown.value = 3  # pick block (1, 3)
    terms = kl.cumulant_terms(model, X, "categorical", 1, 3)
    names = ["difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3", "residual"]
    for p, name in zip(ex.cumulant_panels, names):
        assert_abs_equal(shown(p), terms.as_block(name))
    assert bytes(ex.cumulant_image.value) != cpng and bytes(ex.image.value) != png and ex.table.value != table
    assert ex.metrics.attrs["block"] == (1, 3)
    assert "(W2, W4)" in ex.cumulant_fig._suptitle.get_text()
    # the picked block is outlined on the top figure
    box = ex._boxes[0]
    sl = kl.NetworkView(model).block_slices(LAYERS)
    assert box.get_x() == sl[2].start - 0.5 and box.get_y() == sl[0].start - 0.5
    ex.set_block(3, 2)
    assert ex.block == (3, 2) and ex.metrics.attrs["block"] == (3, 2)
    with pytest.raises(ValueError, match="not among"):
        ex.set_block(0, 1)


def test_fisher_explorer_several_networks(net):
    model, X, y = net
    model2, *_ = trained_net(steps=5, seed=1)
    ex = FisherExplorer(
        {"trained": (model, X, y, "categorical", [1, 2]), "early": (model2, X, y, "categorical", [1, 2, 3])}
    )
    assert ex.network_dropdown in ex.widget.children[0].children
    assert "early" not in ex._studies  # built lazily
    ex.network_dropdown.value = "early"
    F2 = kl.exact_fisher(model2, X, "categorical", layers=[1, 2, 3])
    assert_abs_equal(shown(ex.panels[0]), F2)
    assert [v for _, v in ex.row_dropdown.options] == [1, 2, 3]
    assert_abs_equal(
        shown(ex.cumulant_panels[1]), kl.cumulant_terms(model2, X, "categorical", 1, 2).as_block("kappa4")
    )
    ex.set_network("trained")
    assert shown(ex.panels[0]).shape == (144, 144)


def test_fisher_explorer_from_model(net):
    model, X, y = net
    ex = FisherExplorer(model, X, y, "categorical", layers=[2, 3], block=(3, 3))
    assert ex.block == (3, 3) and ex.study.layers == [2, 3]
    one = FisherExplorer((model, X, y, "categorical", [2, 3]))  # a single (model, X, ...) entry
    assert one.study.layers == [2, 3] and len(one.network_dropdown.options) == 1
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()
    with pytest.raises(ValueError, match="X"):
        FisherExplorer(model)


def test_gamma_move_redraws_only_what_moved(study):
    """A γ move draws the images and the title over the saved frame: the PNG equals a full redraw's."""
    import io

    from PIL import Image

    ex = DampingExplorer(study, gamma=1e-2)
    for choice, gamma in (("both", 0.1), ("block-tridiagonal", 0.1), ("block-tridiagonal", 0.3)):
        ex.inverse_choice.value = choice
        ex.gamma_slider.value = gamma  # with the frame unchanged only the images, block lines and title are drawn
        fast = bytes(ex.image.value)
        ex.grid._background = None  # forget the saved frame: the next render draws everything
        full = ex.grid.png(ex.dpi)
        pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in (fast, full)]
        np.testing.assert_array_equal(pixels[0], pixels[1])
