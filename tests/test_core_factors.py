"""Kronecker factors Ā, G (cross-layer too), F̃ and factored Tikhonov damping (MATH.md §3, §4)."""

from __future__ import annotations

import oracle as O
import pytest
import torch

from kfac_lens import exact_fisher, kronecker_factors

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
problem, N, CASES = O.problem, O.N_CASES, O.NET_CASES


def assert_factors_equal(f, A, G, sel):
    for k in sel:
        for m in sel:
            assert O.rel(f.A[k, m], A[k, m]) < TOL, ("A", k, m)
            assert O.rel(f.G[k, m], G[k, m]) < TOL, ("G", k, m)


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind,layers", CASES)
def test_factors_and_kfac_match_definition(kind, layers, family):
    net, X, _ = problem(kind, family)
    sel = O.all_layers(net, layers)
    f = kronecker_factors(net, X, family, layers=layers)
    A, G = O.kronecker_factors(net, X, family, sel)
    assert f.layers == sel and f.n_cases == N
    assert sorted(f.pairs) == [(k, m) for i, k in enumerate(sel) for m in sel[i:]]
    assert_factors_equal(f, A, G, sel)
    assert torch.equal(f.A[sel[-1], sel[0]], f.A[sel[0], sel[-1]].T)
    Ft = f.dense()
    assert O.rel(Ft, O.kfac_dense(A, G, sel)) < TOL
    # F̃ is a real approximation here: it differs from F (N > 1)
    assert O.rel(Ft, O.exact_fisher(net, X, family, sel)) > 1e-3


@pytest.mark.parametrize("family", O.FAMILIES)
def test_empirical_factors_use_training_targets(family):
    net, X, y = problem("d4", family)
    sel = [0, 1, 2, 3]
    f = kronecker_factors(net, X, family, estimator="empirical", y=y)
    A, G = O.kronecker_factors(net, X, family, sel, y=y)
    assert_factors_equal(f, A, G, sel)
    _, G_exact = O.kronecker_factors(net, X, family, sel)
    assert O.rel(f.G[0, 0], G_exact[0, 0]) > 1e-2


def test_factors_chunked():
    net, X, _ = problem("d3", "bernoulli", n=11)
    f1 = kronecker_factors(net, X, "bernoulli")
    f3 = kronecker_factors(net, X, "bernoulli", chunk_size=3)
    for kl in f1.pairs:
        assert O.rel(f3.A[kl], f1.A[kl]) < 1e-13 and O.rel(f3.G[kl], f1.G[kl]) < 1e-13


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind", ["d3", "d4"])
def test_one_case_kfac_is_exact_for_every_block(kind, family):
    """N = 1: ā does not depend on y, so F_{k,l} = ā_k ā_lᵀ ⊗ E_y[g_k g_lᵀ] = F̃_{k,l} for every block."""
    net, X, _ = problem(kind, family, n=1)
    F = exact_fisher(net, X, family)
    assert O.rel(F, O.exact_fisher(net, X, family)) < TOL
    Ft = kronecker_factors(net, X, family).dense()
    szs = O.sizes(net)
    for i in range(len(szs)):
        for j in range(len(szs)):
            Fb, Tb = O.block(F, szs, i, j), O.block(Ft, szs, i, j)
            assert float((Tb - Fb).norm()) <= TOL * float(Fb.norm()) + 1e-300, (i, j)
    # ... and with two cases it is not.
    net2, X2, _ = problem(kind, family, n=2)
    assert O.rel(kronecker_factors(net2, X2, family).dense(), exact_fisher(net2, X2, family)) > 1e-3


@pytest.mark.parametrize("pi", ["trace", 1, 0.3])
@pytest.mark.parametrize("gamma", [1e-3, 0.1])
def test_damped_factors(gamma, pi):
    net, X, _ = problem("d4", "categorical")
    sel = [0, 1, 2, 3]
    f = kronecker_factors(net, X, "categorical")
    A, G = O.kronecker_factors(net, X, "categorical", sel)
    Ad, Gd, pis = O.damp(A, G, sel, gamma, pi)
    d = f.damped(gamma, pi)
    assert_factors_equal(d, Ad, Gd, sel)
    for k in sel:
        assert f.pi(k, pi) == pytest.approx(pis[k], rel=1e-12)
        for m in sel:
            if m != k:  # cross factors are used as they are
                assert torch.equal(d.A[k, m], f.A[k, m]) and torch.equal(d.G[k, m], f.G[k, m])
    if pi == "trace":  # the trace norm balances the mean eigenvalues of the two damped terms
        for k in sel:
            ta = float(torch.trace(A[k, k])) / A[k, k].shape[0]
            tg = float(torch.trace(G[k, k])) / G[k, k].shape[0]
            assert pis[k] ** 2 == pytest.approx(ta / tg, rel=1e-12)
    # the undamped factors are not modified in place
    assert O.rel(f.A[0, 0], A[0, 0]) < TOL


def test_pairs_tridiag_and_diag():
    net, X, _ = problem("d4", "gaussian")
    full = kronecker_factors(net, X, "gaussian")
    tri = kronecker_factors(net, X, "gaussian", pairs="tridiag")
    dia = kronecker_factors(net, X, "gaussian", pairs="diag")
    assert sorted(tri.pairs) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]
    assert sorted(dia.pairs) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    for kl in tri.pairs:
        assert O.rel(tri.A[kl], full.A[kl]) < 1e-14 and O.rel(tri.G[kl], full.G[kl]) < 1e-14
    with pytest.raises(KeyError, match="pairs='all'"):
        tri.A[0, 2]
    with pytest.raises(ValueError, match="pairs"):
        kronecker_factors(net, X, "gaussian", pairs="everything")


@pytest.mark.parametrize("family", O.FAMILIES)
def test_mc_factors_seeded_and_converge(family):
    net, X, _ = problem("d3", family, n=6)
    _, G = O.kronecker_factors(net, X, family, [0, 1, 2])
    a = kronecker_factors(net, X, family, estimator="mc", samples=8, seed=3)
    b = kronecker_factors(net, X, family, estimator="mc", samples=8, seed=3)
    many = kronecker_factors(net, X, family, estimator="mc", samples=3000, seed=3)
    for kl in a.pairs:
        assert torch.equal(a.G[kl], b.G[kl]) and torch.equal(a.A[kl], b.A[kl])
    e_few = O.rel(a.G[0, 0], G[0, 0])
    e_many = O.rel(many.G[0, 0], G[0, 0])
    assert e_many < 0.05 and e_many < e_few / 4
    assert O.rel(many.A[0, 2], O.kronecker_factors(net, X, family, [0, 2])[0][0, 2]) < TOL  # Ā needs no y


def test_factors_on_device(device):
    net, X, _ = problem("d4", "bernoulli")
    sel = [0, 1, 2, 3]
    A, G = O.kronecker_factors(net, X, "bernoulli", sel)
    f = kronecker_factors(net.to(device), X.to(device), "bernoulli")
    assert f.device.type == device.type
    assert_factors_equal(f, A, G, sel)
    assert O.rel(f.dense(), O.kfac_dense(A, G, sel)) < TOL
