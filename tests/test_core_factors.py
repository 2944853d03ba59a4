"""Kronecker factors Ā, G (cross-layer too), F̃ and factored Tikhonov damping (Section 3, Appendices D, E.3)."""

from __future__ import annotations

import math

import oracle as O
import pytest
import torch

from kfac_lens import block_diagonal_inverse, block_tridiagonal_inverse, kronecker_factors

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
    assert torch.equal(f.A[sel[-1], sel[0]], f.A[sel[0], sel[-1]].T)  # stored once, returned transposed
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
    """N = 1: ā does not depend on y, so F_{k,l} = ā_k ā_lᵀ ⊗ E_y[g_k g_lᵀ] = F̃_{k,l} for every block. The
    reference is the oracle's exact Fisher from per-case Jacobians ∂z/∂θ, not from ā and g."""
    net, X, _ = problem(kind, family, n=1)
    F = O.exact_fisher(net, X, family)
    Ft = kronecker_factors(net, X, family).dense()
    szs = O.sizes(net)
    for i in range(len(szs)):
        for j in range(len(szs)):
            Fb, Tb = O.block(F, szs, i, j), O.block(Ft, szs, i, j)
            assert float((Tb - Fb).norm()) <= TOL * float(Fb.norm()) + 1e-300, (i, j)


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind", ["d3", "d4"])
def test_two_cases_kfac_is_not_exact(kind, family):
    """N = 2 distinct cases: E[ā ā ᵀ ⊗ g gᵀ] ≠ E[ā āᵀ] ⊗ E[g gᵀ] in general, so F̃ ≠ F (oracle's F), even on
    the diagonal blocks."""
    net, X, _ = problem(kind, family, n=2)
    assert float((X[0] - X[1]).norm()) > 0.1
    F = O.exact_fisher(net, X, family)
    Ft = kronecker_factors(net, X, family).dense()
    assert O.rel(Ft, F) > 1e-3
    szs = O.sizes(net)
    assert max(O.rel(O.block(Ft, szs, i, i), O.block(F, szs, i, i)) for i in range(len(szs))) > 1e-3


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
    for k in sel:
        if pi == "trace":  # Appendix E.3: π² = (tr Ā / dim Ā) / (tr G / dim G), traces of the oracle's factors
            ta = sum(float(A[k, k][i, i]) for i in range(A[k, k].shape[0])) / A[k, k].shape[0]
            tg = sum(float(G[k, k][i, i]) for i in range(G[k, k].shape[0])) / G[k, k].shape[0]
            assert f.pi(k, pi) ** 2 == pytest.approx(ta / tg, rel=1e-10)
        else:  # a given π is used as it is (returned by construction, hence exact)
            assert f.pi(k, pi) == float(pi)
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


def test_dense_without_cross_factors_says_pairs_all():
    """F̃ needs every cross pair: factors computed with pairs='diag' (or 'tridiag' over ≥ 3 layers) give a
    ValueError naming pairs='all', not a bare KeyError; where the pairs are there it is the oracle's F̃."""
    net, X, _ = problem("d4", "gaussian")
    for pairs, missing in (("diag", "(0, 1)"), ("tridiag", "(0, 2)")):
        f = kronecker_factors(net, X, "gaussian", pairs=pairs)
        with pytest.raises(ValueError, match="pairs='all'") as info:
            f.dense()
        assert missing in str(info.value) and f"pairs {f.pairs}" in str(info.value)
    A, G = O.kronecker_factors(net, X, "gaussian", [1, 2])
    tri = kronecker_factors(net, X, "gaussian", pairs="tridiag")
    assert O.rel(tri.dense(layers=[1, 2]), O.kfac_dense(A, G, [1, 2])) < TOL
    dia = kronecker_factors(net, X, "gaussian", pairs="diag")
    assert O.rel(dia.dense(layers=[2]), torch.kron(A[2, 2], G[2, 2])) < TOL


@pytest.mark.parametrize("pi", [math.inf, -math.inf, math.nan])
def test_non_finite_pi_is_refused(pi):
    """π = inf used to pass the check and then fail as a singular factor asking for γ > 0."""
    net, X, _ = problem("d3", "categorical")
    f = kronecker_factors(net, X, "categorical")
    with pytest.raises(ValueError, match="pi must be 'trace' or a positive number") as info:
        f.pi(0, pi)
    assert repr(pi) in str(info.value)
    for call in (lambda: f.damped(0.1, pi), lambda: block_diagonal_inverse(f, 0.1, pi=pi),
                 lambda: block_tridiagonal_inverse(f, 0.1, pi=pi)):
        with pytest.raises(ValueError, match="pi must be") as info:
            call()
        assert "gamma" not in str(info.value)


@pytest.mark.parametrize("family", O.FAMILIES)
def test_mc_factors_seeded_and_converge(family):
    net, X, _ = problem("d3", family, n=6)
    _, G = O.kronecker_factors(net, X, family, [0, 1, 2])
    a = kronecker_factors(net, X, family, estimator="mc", samples=8, seed=3)
    b = kronecker_factors(net, X, family, estimator="mc", samples=8, seed=3)
    many = kronecker_factors(net, X, family, estimator="mc", samples=3000, seed=3)
    for kl in a.pairs:  # same seed, same sequence of operations: bit-identical by construction
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


def test_kron_accepts_non_contiguous_factors():
    """torch.kron (2.13) raises on a transposed input; the package's kron gives A ⊗ B for any layout."""
    from kfac_lens.curvature.blocks import kron
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64, generator=g)
    B = torch.randn(4, 2, dtype=torch.float64, generator=g)
    ref = torch.stack([torch.stack([A[i, j] * B.T for j in range(3)], 0) for i in range(3)], 0)
    ref = ref.permute(0, 2, 1, 3).reshape(3 * 2, 3 * 4)
    assert torch.equal(kron(A, B.T), ref)


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
def test_exact_factors_of_an_autoencoder_take_the_output_fisher_pass(family):
    """On an autoencoder-shaped chain (wide output, narrow middle) kronecker_factors propagates the output
    Fisher instead of capturing R = 12 directions per case (curvature/output_fisher.py); the factors are
    still the definition's, every pair, also for a subset of layers and with chunks."""
    from kfac_lens.capture import analysis_view
    from kfac_lens.curvature.output_fisher import output_fisher_is_cheaper

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(12, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Sigmoid(),
                              torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 12)).double()
    X = O.make_inputs(net, 9, seed=4)
    for layers in (None, [1, 3]):
        sel = O.all_layers(net, layers)
        assert output_fisher_is_cheaper(analysis_view(net, torch.float64), sel)
        f = kronecker_factors(net, X, family, layers=layers, chunk_size=4)
        A, G = O.kronecker_factors(net, X, family, sel)
        assert f.n_cases == 9 and f.estimator == "exact"
        assert_factors_equal(f, A, G, sel)
