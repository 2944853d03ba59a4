"""ApproximationExplorer: built, every control moved, table and figures followed, values as compare_approximations.

Driven through the widgets' callbacks, no browser (docs/testing.md, "Widgets"). Timings are recorded, never
asserted."""

from __future__ import annotations

import math

import ipywidgets as W
import pytest
from digits_nets import trained_net

from kfac_lens.curvature.quality import compare_approximations
from kfac_lens.widgets import ApproximationExplorer

pytestmark = pytest.mark.usefixtures("agg_backend")

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = [1, 2, 3]
TIMINGS = {"compute_s", "draw_s", "render_s", "total_s"}


@pytest.fixture(scope="module")
def net():
    return trained_net(steps=60, n=200)


@pytest.fixture(scope="module")
def explorer(net):
    model, X, y = net
    return ApproximationExplorer(model, X, "categorical", y, layers=LAYERS, gamma=0.05, top_k=5)


def _dense(net, gamma, layers, spectra):
    model, X, y = net
    return compare_approximations(model, X, "categorical", y=y, gamma=gamma, layers=layers, spectra=spectra,
                                  top_k=5).set_index("approximation")


def _check_against_dense(ex, net):
    ref = _dense(net, ex.gamma, ex.layers, ex.shown)
    for row in ex.metrics.itertuples():
        r = ref.loc[row.approximation]
        assert math.isclose(row.rel_frobenius, r.rel_frobenius, rel_tol=1e-10)
        assert math.isclose(row.ng_cosine, r.ng_cosine, rel_tol=1e-8)
        if row.approximation in ex.shown:
            assert math.isclose(row.theta_max, r.top_eigs_precond[0], rel_tol=1e-7)
            assert row.precond_cond <= r.precond_cond * (1 + 1e-8)  # a Ritz ratio: a lower bound
        else:
            assert math.isnan(row.theta_max)


def test_built(explorer, net):
    ex = explorer
    assert isinstance(ex.widget, W.VBox) and hasattr(ex, "_ipython_display_")
    assert ex.gamma_slider.description == "γ" and ex.layers == LAYERS
    assert ex.shown == ["kfac-blockdiag", "kfac-tridiag"]
    assert bytes(ex.image.value).startswith(PNG) and bytes(ex.matrix_image.value).startswith(PNG)
    assert "<table" in ex.table.value and "P = " in ex.status.value
    assert list(ex.metrics.columns) == ["approximation", "rel_frobenius", "ng_cosine", "theta_max", "precond_cond"]
    assert TIMINGS <= set(ex.timings)
    _check_against_dense(ex, net)


def test_gamma_move(explorer, net):
    ex = explorer
    before = ex.metrics.copy()
    png, matrices = bytes(ex.image.value), bytes(ex.matrix_image.value)
    ex.gamma_slider.value = 0.2
    assert math.isclose(ex.gamma, 0.2, rel_tol=1e-9)
    assert bytes(ex.image.value) != png
    assert bytes(ex.matrix_image.value) == matrices  # the matrices do not depend on γ
    assert (ex.metrics["rel_frobenius"] == before["rel_frobenius"]).all()
    assert not (ex.metrics["ng_cosine"] == before["ng_cosine"]).all()
    assert ex.timings["total_s"] > 0
    _check_against_dense(ex, net)
    ex.gamma_slider.value = 0.05  # back: every number from the cache
    assert ex.metrics.equals(before)
    assert ex.timings["compute_s"] < 0.5


def test_approximation_move(explorer, net):
    ex = explorer
    matrices = bytes(ex.matrix_image.value)
    ex.approx_select.value = ("ekfac", "diagonal", "kfac")
    assert ex.shown == ["kfac", "ekfac", "diagonal"]
    assert bytes(ex.matrix_image.value) != matrices  # the first shown approximation's matrix
    assert ex.metrics.set_index("approximation")["theta_max"].notna().sum() == 3
    _check_against_dense(ex, net)
    ex.approx_select.value = ("kfac-blockdiag", "kfac-tridiag")


def test_layer_move(explorer, net):
    ex = explorer
    status = ex.status.value
    ex.layer_select.value = (2, 3)
    assert ex.layers == [2, 3] and ex.status.value != status
    _check_against_dense(ex, net)
    ex.layer_select.value = ()
    assert "Select at least one layer" in ex.status.value
    ex.layer_select.value = tuple(LAYERS)
    assert ex.status.value.startswith("<small>P = ")


def test_refusals(net):
    model, X, y = net
    with pytest.raises(ValueError, match="max_params"):
        ApproximationExplorer(model, X, "categorical", y, layers=LAYERS, max_params=10)
    with pytest.raises(ValueError, match="shown"):
        ApproximationExplorer(model, X, "categorical", y, layers=LAYERS, approximations=["kfac"])


@pytest.mark.timeout(180)
def test_example_network_timings():
    from kfac_lens import zoo

    entry = zoo.example_network("quick", "digits", progress=False)
    ex = ApproximationExplorer(entry.model, entry.X[:500], "categorical", entry.y[:500], layers=[1, 2, 3, 4],
                               gamma=float(entry.gamma))
    assert ex.quality.view.n_params([1, 2, 3, 4]) == 1680
    for g in (float(entry.gamma) * 1.5, float(entry.gamma)):
        ex.gamma_slider.value = g
        assert TIMINGS <= set(ex.timings)
        print(f"γ = {g:.3g}: {ex.timings}")
