"""The approximate inverses F̆⁻¹, F̂⁻¹, exact Tikhonov and the Appendix I solver (Sections 3.2, 3.3, E.3, I).

Every inverse is checked against the independent dense oracle (tests/oracle.py); the numerical guards
(SingularFactorError above 1/(100·eps), RuntimeWarning above eps^(-2/3)) against hand-made matrices of known
condition number.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace

import oracle as O
import pytest
import torch

from kfac_lens import (
    BlockDiagonalInverse,
    BlockTridiagonalInverse,
    KroneckerSumInverse,
    SingularFactorError,
    block_diagonal_inverse,
    block_tridiagonal_inverse,
    exact_tikhonov_inverse,
    kronecker_factors,
    make_inverse,
    vec_to_mats,
)
from kfac_lens.curvature.factors import KroneckerFactors
from kfac_lens.curvature.inverses import factor_eigs
from kfac_lens.curvature.operators import PDFactor

pytestmark = pytest.mark.usefixtures("single_thread")

# Inverting damped factors at γ = 1e-3 has condition numbers up to ~1e6 here, so rounding reaches ~1e-11;
# at γ = 0.1 it stays near 1e-15.
TOL = {1e-3: 1e-9, 0.1: 1e-10}
N = 10
PROBLEMS = [("d2", "gaussian", None), ("d3", "categorical", None), ("d4", "bernoulli", None),
            ("d4", "gaussian", [0, 2]), ("d4", "categorical", [1, 2, 3])]


def contiguous(sel) -> bool:
    return all(b == a + 1 for a, b in zip(sel[:-1], sel[1:]))


def setup(kind, family, layers, gamma, pi, n=N) -> SimpleNamespace:
    """The network, its inputs, the layers, kfac_lens' factors and the oracle's damped factors."""
    net = O.make_net(kind)
    X = O.make_inputs(net, n)
    sel = O.all_layers(net, layers)
    f = kronecker_factors(net, X, family, layers=layers)
    A, G = O.kronecker_factors(net, X, family, sel)
    Ad, Gd, _ = O.damp(A, G, sel, gamma, pi)
    return SimpleNamespace(net=net, X=X, sel=sel, f=f, Ad=Ad, Gd=Gd)


def check_operator_matches_dense(op, D, shapes, tol):
    """apply (list of matrices), matvec (flat), @ (flat and P×m columns) all equal the dense matrix."""
    P = D.shape[0]
    gen = torch.Generator().manual_seed(11)
    V = torch.randn(P, 4, generator=gen, dtype=torch.float64).to(D.device)
    assert O.rel(op @ V[:, 0], D @ V[:, 0]) < tol
    assert O.rel(op.matvec(V[:, 1]), D @ V[:, 1]) < tol
    assert O.rel(op @ V, D @ V) < tol
    out = op.apply(vec_to_mats(V[:, 2], shapes))
    assert [tuple(M.shape) for M in out] == [tuple(s) for s in shapes]
    assert O.rel(torch.cat([O.vec(M) for M in out]), D @ V[:, 2]) < tol
    out_list = op @ vec_to_mats(V[:, 3], shapes)
    assert O.rel(torch.cat([O.vec(M) for M in out_list]), D @ V[:, 3]) < tol


def blocks_of(M, szs):
    n = len(szs)
    return {(i, j): O.block(M, szs, i, j) for i in range(n) for j in range(n)}


@pytest.mark.parametrize("pi", ["trace", 1])
@pytest.mark.parametrize("gamma", [1e-3, 0.1])
@pytest.mark.parametrize("kind,family,layers", PROBLEMS)
def test_block_diagonal_inverse(kind, family, layers, gamma, pi):
    p = setup(kind, family, layers, gamma, pi)
    tol = TOL[gamma]
    op = block_diagonal_inverse(p.f, gamma, pi=pi)
    assert isinstance(op, BlockDiagonalInverse) and op.layers == p.sel
    D = op.dense()
    Do = O.blockdiag_inverse(p.Ad, p.Gd, p.sel)
    assert O.rel(D, Do) < tol
    szs = O.sizes(p.net, p.sel)
    for (i, j), B in blocks_of(D, szs).items():
        if i != j:  # exactly 0 by construction (dense() is a torch.block_diag)
            assert torch.equal(B, torch.zeros_like(B)), (i, j)
    check_operator_matches_dense(op, D, O.shapes(p.net, p.sel), tol)
    # F̆ itself: the diagonal blocks of damped F̃, exactly zero elsewhere
    Fb = op.dense_approximation()
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    for (i, j), B in blocks_of(Fb, szs).items():
        if i == j:
            assert O.rel(B, O.block(Ft, szs, i, i)) < 1e-13
        else:  # exactly 0 by construction (torch.block_diag)
            assert torch.equal(B, torch.zeros_like(B))
    assert O.rel(Fb @ D, torch.eye(D.shape[0], dtype=D.dtype)) < tol


@pytest.mark.parametrize("pi", ["trace", 1])
@pytest.mark.parametrize("gamma", [1e-3, 0.1])
@pytest.mark.parametrize("kind,family,layers", PROBLEMS)
def test_block_tridiagonal_inverse(kind, family, layers, gamma, pi):
    p = setup(kind, family, layers, gamma, pi)
    tol = TOL[gamma]
    # non-consecutive layers ([0, 2]) only by name: consecutive *selected* layers as neighbours, which is what
    # the oracle's chain over ``sel`` computes (test_tridiagonal_refuses_non_consecutive_layers)
    op = block_tridiagonal_inverse(p.f, gamma, pi=pi, neighbours="network" if contiguous(p.sel) else "selected")
    assert isinstance(op, BlockTridiagonalInverse) and op.layers == p.sel
    D = op.dense()
    assert O.rel(D, O.tridiag_inverse(p.Ad, p.Gd, p.sel)) < tol
    szs = O.sizes(p.net, p.sel)
    # F̂⁻¹ is block-tridiagonal: dense() never writes the other blocks, so they are exactly 0 by construction
    for (i, j), B in blocks_of(D, szs).items():
        if abs(i - j) > 1:
            assert torch.equal(B, torch.zeros_like(B)), (i, j)
        else:
            assert float(B.abs().max()) > 0
    # the tridiagonal blocks of F̂ = inv(F̂⁻¹) are those of the damped F̃
    Fh = torch.linalg.inv(D)
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    for (i, j), B in blocks_of(Fh, szs).items():
        if abs(i - j) <= 1:
            assert O.rel(B, O.block(Ft, szs, i, j)) < tol, (i, j)
    Fha = op.dense_approximation()
    assert O.rel(Fha, Fh) < tol
    for (i, j), B in blocks_of(Fha, szs).items():
        if abs(i - j) <= 1:
            assert O.rel(B, O.block(Ft, szs, i, j)) < tol, (i, j)
    check_operator_matches_dense(op, D, O.shapes(p.net, p.sel), tol)


def test_tridiagonal_differs_from_block_diagonal_and_f_tilde():
    """With ≥ 3 layers F̂ fills the off-tridiagonal blocks differently from F̃ (so the checks above bite): its
    (0, 2) block is the chain's F̃₀₁F̃₁₁⁻¹F̃₁₂ (damped), and F̂⁻¹ is not F̆⁻¹ — all against the oracle."""
    p = setup("d4", "categorical", None, 0.1, "trace")
    szs = O.sizes(p.net, p.sel)
    tri = block_tridiagonal_inverse(p.f, 0.1)
    ref_tri = O.tridiag_inverse(p.Ad, p.Gd, p.sel)
    ref_bd = O.blockdiag_inverse(p.Ad, p.Gd, p.sel)
    assert O.rel(tri.dense(), ref_tri) < 1e-10
    assert O.rel(block_diagonal_inverse(p.f, 0.1).dense(), ref_bd) < 1e-10
    assert O.rel(ref_tri, ref_bd) > 1e-3
    Fh = tri.dense_approximation()
    assert O.rel(Fh, torch.linalg.inv(ref_tri)) < 1e-10
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    assert O.rel(O.block(Fh, szs, 0, 2), O.block(Ft, szs, 0, 2)) > 1e-3
    chain = O.block(Ft, szs, 0, 1) @ torch.linalg.inv(O.block(Ft, szs, 1, 1)) @ O.block(Ft, szs, 1, 2)
    assert O.rel(O.block(Fh, szs, 0, 2), chain) < 1e-10


def test_inverse_layer_subset_of_full_factors():
    """An inverse over a layer subset of all-layer factors equals the oracle's on those layers (and the one
    from factors of just those layers): [0, 2] block-diagonal and, by name, "selected" tridiagonal; [1, 2]."""
    net = O.make_net("d4")
    X = O.make_inputs(net, N)
    full = kronecker_factors(net, X, "gaussian")
    for sel, nb in (([0, 2], "selected"), ([1, 2], "network")):
        sub = kronecker_factors(net, X, "gaussian", layers=sel)
        A, G = O.kronecker_factors(net, X, "gaussian", sel)
        Ad, Gd, _ = O.damp(A, G, sel, 0.1)
        for make, ref in ((block_diagonal_inverse, O.blockdiag_inverse(Ad, Gd, sel)),
                          (partial(block_tridiagonal_inverse, neighbours=nb), O.tridiag_inverse(Ad, Gd, sel))):
            a = make(full, 0.1, layers=sel).dense()
            assert O.rel(a, ref) < 1e-10, (sel, nb)
            assert O.rel(make(sub, 0.1).dense(), ref) < 1e-10, (sel, nb)


def test_tridiagonal_refuses_non_consecutive_layers():
    """Layers [0, 2]: the network's F̂ (Section 3.3) restricted to them has (0, 2) block F̃₀₁F̃₁₁⁻¹F̃₁₂, not F̃₀₂,
    so the default refuses; neighbours="selected" gives the oracle's chain over the selected layers, which
    is measurably not the network's F̂ restricted to [0, 2]."""
    net = O.make_net("d4")
    X = O.make_inputs(net, N)
    full = kronecker_factors(net, X, "gaussian")
    sub = kronecker_factors(net, X, "gaussian", layers=[0, 2], pairs="tridiag")
    for call in (lambda: block_tridiagonal_inverse(full, 0.1, layers=[0, 2]),
                 lambda: block_tridiagonal_inverse(sub, 0.1),
                 lambda: BlockTridiagonalInverse(full, 0.1, layers=[0, 1, 3]),
                 lambda: make_inverse("tridiag", full, 0.1, layers=[0, 2])):
        with pytest.raises(ValueError, match="not consecutive layers") as info:
            call()
        assert "neighbours='selected'" in str(info.value) and "Section 3.3" in str(info.value)
    with pytest.raises(ValueError, match="neighbours must be one of"):
        block_tridiagonal_inverse(full, 0.1, neighbours="chain")
    with pytest.raises(ValueError, match="neighbours must be one of"):
        make_inverse("tridiag", full, 0.1, neighbours="chain")
    # by name: consecutive selected layers as neighbours, = the oracle's chain over [0, 2]
    A, G = O.kronecker_factors(net, X, "gaussian", [0, 1, 2, 3])
    Ad, Gd, _ = O.damp(A, G, [0, 1, 2, 3], 0.1)
    sel_ref = O.tridiag_inverse(Ad, Gd, [0, 2])
    for op in (block_tridiagonal_inverse(full, 0.1, layers=[0, 2], neighbours="selected"),
               block_tridiagonal_inverse(sub, 0.1, neighbours="selected"),
               make_inverse("tridiag", full, 0.1, layers=[0, 2], neighbours="selected")):
        assert op.neighbours == "selected"
        assert O.rel(op.dense(), sel_ref) < 1e-10
    # ... which is not the paper's F̂ of the network restricted to layers 0 and 2
    Fh_net = O.restrict_blocks(torch.linalg.inv(O.tridiag_inverse(Ad, Gd, [0, 1, 2, 3])), O.sizes(net), [0, 2])
    assert O.rel(torch.linalg.inv(sel_ref), Fh_net) > 1e-3


@pytest.mark.parametrize("sub", [[1, 2, 3], [0, 1], [2, 3]])
def test_consecutive_layers_give_the_network_f_hat_restricted(sub):
    """For consecutive layers F̂ of the sub-chain is the network's F̂ restricted to them (the claim in
    BlockTridiagonalInverse's docstring), checked against the oracle's F̂ of all four layers of d4."""
    net = O.make_net("d4")
    X = O.make_inputs(net, N)
    allk = [0, 1, 2, 3]
    A, G = O.kronecker_factors(net, X, "categorical", allk)
    Ad, Gd, _ = O.damp(A, G, allk, 0.1)
    Fh_net = torch.linalg.inv(O.tridiag_inverse(Ad, Gd, allk))
    ref = O.restrict_blocks(Fh_net, O.sizes(net), sub)
    for f in (kronecker_factors(net, X, "categorical"), kronecker_factors(net, X, "categorical", layers=sub)):
        op = block_tridiagonal_inverse(f, 0.1, layers=sub)
        assert O.rel(op.dense_approximation(), ref) < 1e-9
        assert O.rel(op.dense(), torch.linalg.inv(ref)) < 1e-9


def test_single_layer_tridiagonal_is_block_diagonal():
    p = setup("d3", "categorical", [1], 0.1, "trace")
    D = block_tridiagonal_inverse(p.f, 0.1).dense()
    assert O.rel(D, O.blockdiag_inverse(p.Ad, p.Gd, [1])) < 1e-12
    assert O.rel(D, O.tridiag_inverse(p.Ad, p.Gd, [1])) < 1e-12


def test_make_inverse_and_pairs_requirements():
    net = O.make_net("d3")
    X = O.make_inputs(net, N)
    sel = [0, 1, 2]
    A, G = O.kronecker_factors(net, X, "bernoulli", sel)
    Ad, Gd, _ = O.damp(A, G, sel, 0.1)
    f = kronecker_factors(net, X, "bernoulli", pairs="diag")
    bd = make_inverse("blockdiag", f, 0.1)
    assert isinstance(bd, BlockDiagonalInverse)
    assert O.rel(bd.dense(), O.blockdiag_inverse(Ad, Gd, sel)) < 1e-10
    Ft = O.kfac_dense(Ad, Gd, sel)
    szs = O.sizes(net)
    assert O.rel(bd.dense_approximation(), torch.block_diag(*[O.block(Ft, szs, i, i) for i in range(3)])) < 1e-13
    with pytest.raises(ValueError, match="pairs='tridiag'"):
        make_inverse("tridiag", f, 0.1)
    tri = kronecker_factors(net, X, "bernoulli", pairs="tridiag")
    assert O.rel(make_inverse("tridiag", tri, 0.1).dense(), O.tridiag_inverse(Ad, Gd, sel)) < 1e-10
    with pytest.raises(ValueError, match="blockdiag"):
        make_inverse("diagonal", f, 0.1)


@pytest.mark.parametrize("xi", [1e-2, 1.0])
def test_exact_tikhonov_inverse(xi):
    net = O.make_net("d4")
    X = O.make_inputs(net, N)
    sel = [0, 1, 2, 3]
    f = kronecker_factors(net, X, "categorical")
    A, G = O.kronecker_factors(net, X, "categorical", sel)
    op = exact_tikhonov_inverse(f, xi)
    D = op.dense()
    Do = O.exact_tikhonov_inverse(A, G, sel, xi)
    assert O.rel(D, Do) < 1e-10
    check_operator_matches_dense(op, D, O.shapes(net, sel), 1e-10)
    # it is not the factored-Tikhonov block-diagonal inverse
    Ad, Gd, _ = O.damp(A, G, sel, xi ** 0.5)
    assert O.rel(D, O.blockdiag_inverse(Ad, Gd, sel)) > 1e-3


def spd(n, gen, rank=None, shift=0.0):
    L = torch.randn(n, n if rank is None else rank, generator=gen, dtype=torch.float64)
    return L @ L.T / n + shift * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("sign", [1, -1])
def test_kronecker_sum_inverse(sign):
    gen = torch.Generator().manual_seed(4)
    A, B = spd(4, gen, shift=0.1), spd(3, gen, shift=0.1)
    C, D = spd(4, gen, rank=2), spd(3, gen)
    if sign == -1:  # scale so that A⊗B − C⊗D stays positive definite (eigenvalues of A⁻¹C, B⁻¹D below 0.9)
        C = C * 0.9 / float(torch.linalg.eigvals(torch.linalg.solve(A, C)).real.max())
        D = D * 0.9 / float(torch.linalg.eigvals(torch.linalg.solve(B, D)).real.max())
    op = KroneckerSumInverse(A, B, C, D, sign=sign)
    ref = torch.linalg.inv(torch.kron(A, B) + sign * torch.kron(C, D))
    assert O.rel(op.dense(), ref) < 1e-10
    V = torch.randn(3, 4, generator=gen, dtype=torch.float64)  # (dim B, dim A)
    assert O.rel(O.vec(op.apply(V)), ref @ O.vec(V)) < 1e-10
    with pytest.raises(ValueError, match="sign"):
        KroneckerSumInverse(A, B, C, D, sign=0)


def test_inverses_on_device(device):
    p = setup("d4", "categorical", None, 0.1, "trace")
    fd = kronecker_factors(p.net.to(device), p.X.to(device), "categorical")
    for op, ref in ((block_diagonal_inverse(fd, 0.1), O.blockdiag_inverse(p.Ad, p.Gd, p.sel)),
                    (block_tridiagonal_inverse(fd, 0.1), O.tridiag_inverse(p.Ad, p.Gd, p.sel))):
        D = op.dense()
        assert D.device.type == device.type
        assert O.rel(D, ref) < 1e-10
        v = torch.randn(D.shape[0], dtype=torch.float64, device=device)
        assert O.rel(op @ v, ref @ v.cpu()) < 1e-10


def test_oracle_tridiagonal_inverse_has_the_defining_properties():
    """Sanity of the oracle itself: its Ξᵀ Λ Ξ is block-tridiagonal and inverts to F̃ on the tridiagonal."""
    p = setup("d4", "gaussian", None, 0.1, "trace")
    D = O.tridiag_inverse(p.Ad, p.Gd, p.sel)
    Fh = torch.linalg.inv(D)
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    szs = O.sizes(p.net, p.sel)
    for (i, j), B in blocks_of(D, szs).items():
        if abs(i - j) > 1:  # Ξ, Λ have no entries there, so exactly 0 by construction
            assert float(B.abs().max()) == 0.0
        else:
            assert O.rel(O.block(Fh, szs, i, j), O.block(Ft, szs, i, j)) < 1e-10


def test_block_diagonal_low_rank_product():
    """Appendix G: for a gradient (1/m) Σ g aᵀ the low-rank product equals the block's G⁻¹ V Ā⁻¹."""
    p = setup("d3", "categorical", None, 0.1, "trace")
    op = block_diagonal_inverse(p.f, 0.1)
    gen = torch.Generator().manual_seed(5)
    for i, (d, a_dim) in enumerate(O.shapes(p.net)):
        g_cols = torch.randn(d, 4, generator=gen, dtype=torch.float64)
        a_rows = torch.randn(4, a_dim, generator=gen, dtype=torch.float64)
        V = g_cols @ a_rows / 4
        U = op.apply_low_rank(i, g_cols, a_rows, 0.25)
        ref = O.unvec(O.block(O.blockdiag_inverse(p.Ad, p.Gd, p.sel), O.sizes(p.net), i, i) @ O.vec(V), d, a_dim)
        assert O.rel(U, ref) < 1e-10


def test_shared_eigendecomposition_gives_the_same_block_diagonal_inverse():
    """The γ search shares one eigendecomposition of the undamped factors (kfac_lens.curvature.inverses.factor_eigs);
    it must give the oracle's inverse, as the Cholesky path does, at every γ."""
    net = O.make_net("d3")
    X = O.make_inputs(net, 40)
    fac = kronecker_factors(net, X, "categorical")
    A, G = O.kronecker_factors(net, X, "categorical", [0, 1, 2])
    eigs = factor_eigs(fac)
    for g in (1e-3, 0.1, 3.0):
        Ad, Gd, _ = O.damp(A, G, [0, 1, 2], g)
        ref = O.blockdiag_inverse(Ad, Gd, [0, 1, 2])
        assert O.rel(block_diagonal_inverse(fac, g).dense(), ref) < 1e-9
        assert O.rel(BlockDiagonalInverse(fac, g, eigs=eigs).dense(), ref) < 1e-9


# ------------------------------------------------------------------ numerical guards (Sections 3.2, 3.3, Appendix I)
# The rule (kfac_lens.curvature.operators.cond_limits): refuse κ > 1/(100·eps) of the result's dtype (float64
# ≈ 4.5e13, float32 ≈ 8.4e4), warn κ > eps^(-2/3) (float64 ≈ 2.7e10, float32 ≈ 4.1e4). The κ's below sit
# well inside one band each; diagonal matrices have κ₁ = κ₂ exactly.
BANDS = {torch.float64: {"fine": 1e8, "warn": 1e12, "refuse": 1e15},
         torch.float32: {"fine": 1e3, "warn": 6e4, "refuse": 1e6}}


@contextmanager
def no_warnings():
    """Turn any RuntimeWarning (a nearly singular factor) into a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def kappa_in(msg: str) -> float:
    return float(re.search(r"condition number ([0-9.e+-]+)", msg).group(1))


def test_condition_limits_are_the_documented_ones():
    from kfac_lens.curvature.operators import cond_limits

    w64, r64 = cond_limits(torch.float64)
    w32, r32 = cond_limits(torch.float32)
    assert w64 == pytest.approx(2.7e10, rel=0.02) and r64 == pytest.approx(4.5e13, rel=0.01)
    assert w32 == pytest.approx(4.1e4, rel=0.02) and r32 == pytest.approx(8.4e4, rel=0.01)
    for dtype, band in BANDS.items():
        w, r = cond_limits(dtype)
        assert band["fine"] < w < band["warn"] < r < band["refuse"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pd_factor_condition_rule(dtype):
    """PDFactor: below the warning limit silent, in the band a RuntimeWarning with κ (and the exact inverse,
    not clamped), above it SingularFactorError naming the factor, κ and the way out."""
    def diag(kappa):
        return torch.diag(torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), 5, dtype=torch.float64))

    with no_warnings():
        PDFactor(diag(BANDS[dtype]["fine"]).to(dtype), "Ā[3,3] of layer 3")
    M = diag(BANDS[dtype]["warn"])
    with pytest.warns(RuntimeWarning, match="condition number") as rec:
        inv = PDFactor(M.to(dtype), "Ā[3,3] of layer 3").inv()
    msg = str(rec[0].message)
    assert "Ā[3,3] of layer 3" in msg and "Increase gamma" in msg
    assert kappa_in(msg) == pytest.approx(BANDS[dtype]["warn"], rel=1e-2)
    # not clamped: the inverse of the (float64) matrix handed over, to rounding
    assert O.rel(inv, torch.diag(1.0 / torch.diagonal(M.to(dtype).double()))) < 1e-12
    with pytest.raises(SingularFactorError, match="condition number") as info:
        PDFactor(diag(BANDS[dtype]["refuse"]).to(dtype), "G[1,1] of layer 1")
    msg = str(info.value)
    assert "G[1,1] of layer 1" in msg and "Increase gamma" in msg
    assert kappa_in(msg) == pytest.approx(BANDS[dtype]["refuse"], rel=1e-2)
    with pytest.raises(SingularFactorError, match="not positive definite"):
        PDFactor(torch.diag(torch.tensor([1.0, -1e-3], dtype=dtype)), "G[1,1] of layer 1")


def test_rank_one_factors_at_tiny_gamma_are_refused():
    """N = 1 makes every Ā rank one; γ = 1e-14 used to give F̆⁻¹ entries near 1e27 without a word. Now every
    path (Cholesky, the shared eigendecomposition, F̂⁻¹, make_inverse) refuses, γ = 1e-12 warns, and the way
    out named in the message (a larger γ) works."""
    net = O.make_net("d3")
    X = O.make_inputs(net, 1)
    f = kronecker_factors(net, X, "categorical")
    eigs = factor_eigs(f)
    for call in (lambda g: block_diagonal_inverse(f, g), lambda g: BlockDiagonalInverse(f, g, eigs=eigs),
                 lambda g: block_tridiagonal_inverse(f, g), lambda g: make_inverse("tridiag", f, g)):
        with pytest.raises(SingularFactorError, match="condition number") as info, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # factors in the warning band before the refused one
            call(1e-14)
        assert "layer" in str(info.value) and "Increase gamma" in str(info.value)
        assert kappa_in(str(info.value)) > 4.5e13
    for call in (lambda g: block_diagonal_inverse(f, g), lambda g: BlockDiagonalInverse(f, g, eigs=eigs)):
        with pytest.warns(RuntimeWarning, match="condition number"):
            call(1e-12)
    A, G = O.kronecker_factors(net, X, "categorical", [0, 1, 2])
    Ad, Gd, _ = O.damp(A, G, [0, 1, 2], 1e-2)
    with no_warnings():
        assert O.rel(block_diagonal_inverse(f, 1e-2).dense(), O.blockdiag_inverse(Ad, Gd, [0, 1, 2])) < 1e-8
        assert O.rel(block_tridiagonal_inverse(f, 1e-2).dense(), O.tridiag_inverse(Ad, Gd, [0, 1, 2])) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kronecker_sum_inverse_condition_rule(dtype):
    """Appendix I with A = I₃, B = I₂, C = diag(1, ½, 0), D = diag(1 − ε, 0.3): 1 − s₂s₁ᵀ spans [ε, 1], so the
    condition number of A⊗B − C⊗D is exactly 1/ε; nothing is clamped any more."""
    A, B = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    C = torch.diag(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))

    def op(eps, name="Σ_{4|5}"):
        D = torch.diag(torch.tensor([1.0 - eps, 0.3], dtype=torch.float64)).to(dtype).double()
        return (lambda: KroneckerSumInverse(A.to(dtype), B.to(dtype), C.to(dtype), D.to(dtype), sign=-1, name=name),
                lambda: torch.linalg.inv(torch.kron(A, B) - torch.kron(C, D)))  # of the matrices as handed over

    make, exact = op(1.0 / BANDS[dtype]["fine"])
    with no_warnings():
        assert O.rel(make().dense(), exact()) < (1e-12 if dtype == torch.float64 else 1e-6)
    make, exact = op(1.0 / BANDS[dtype]["warn"])
    with pytest.warns(RuntimeWarning, match="condition number") as rec:
        D = make().dense()
    assert "Σ_{4|5}" in str(rec[0].message) and "Increase gamma" in str(rec[0].message)
    assert O.rel(D, exact()) < (1e-3 if dtype == torch.float64 else 1e-2)  # the answer, not a clamped one
    make, _ = op(1.0 / BANDS[dtype]["refuse"])
    with pytest.raises(SingularFactorError, match="condition number") as info:
        make()
    assert "Σ_{4|5}" in str(info.value) and "Increase gamma" in str(info.value)
    # barely negative (1 − s₂s₁ = −1e-13, float32: −1e-6): not positive definite, refused rather than clamped
    make, _ = op(-1e-13 if dtype == torch.float64 else -1e-6)
    with pytest.raises(SingularFactorError, match="not positive definite"):
        make()


def chain_factors(eps, dtype=torch.float64):
    """Two layers whose Ā's are perfectly correlated in one direction and G's nearly so (1 − ε): at γ = 0 the
    diagonal factors are I but Σ_{0|1} has condition number 1/ε (the oracle's dicts alongside)."""
    I2 = torch.eye(2, dtype=torch.float64)
    A01 = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    G01 = torch.diag(torch.tensor([(1.0 - eps) ** 0.5, 0.0], dtype=torch.float64))
    A = {(0, 0): I2, (1, 1): I2, (0, 1): A01, (1, 0): A01.T}
    G = {(0, 0): I2, (1, 1): I2, (0, 1): G01, (1, 0): G01.T}
    f = KroneckerFactors({kl: t.to(dtype) for kl, t in A.items() if kl != (1, 0)},
                         {kl: t.to(dtype) for kl, t in G.items() if kl != (1, 0)},
                         [0, 1], {0: (2, 2), 1: (2, 2)}, n_cases=1)
    return f, A, G


def test_tridiagonal_schur_complement_condition_rule():
    """Σ_{0|1} (Section 3.3, via Appendix I) under the same rule as the factors: refused, warned (and then the
    oracle's answer, unclamped), silent; and the way out, a larger γ, works."""
    f, A, G = chain_factors(1e-15)
    with pytest.raises(SingularFactorError, match="condition number") as info:
        block_tridiagonal_inverse(f, 0.0)
    assert "Σ_{0|1}" in str(info.value) and "Increase gamma" in str(info.value)
    f, A, G = chain_factors(1e-12)
    with pytest.warns(RuntimeWarning, match="condition number") as rec:
        D = block_tridiagonal_inverse(f, 0.0).dense()
    assert "Σ_{0|1}" in str(rec[0].message)
    assert O.rel(D, O.tridiag_inverse(A, G, [0, 1])) < 1e-3
    Ad, Gd, _ = O.damp(A, G, [0, 1], 1e-3)
    with no_warnings():
        assert O.rel(block_tridiagonal_inverse(f, 1e-3).dense(), O.tridiag_inverse(Ad, Gd, [0, 1])) < 1e-9


def test_tridiagonal_condition_rule_follows_the_result_dtype():
    """κ(Σ_{0|1}) = 1e6 is fine for a float64 result but above float32's limit (8.4e4): refused, not clamped."""
    f, A, G = chain_factors(1e-6)
    with no_warnings():
        assert O.rel(block_tridiagonal_inverse(f, 0.0).dense(), O.tridiag_inverse(A, G, [0, 1])) < 1e-8
    f32, _, _ = chain_factors(1e-6, torch.float32)
    with pytest.raises(SingularFactorError, match="float32"):
        block_tridiagonal_inverse(f32, 0.0)


def test_exact_tikhonov_follows_the_same_rule():
    """(Ā⊗G + ξI)⁻¹ of rank-one factors: ξ = 1e-16 is refused, ξ = 1e-12 warns, naming the damping."""
    net = O.make_net("d3")
    f = kronecker_factors(net, O.make_inputs(net, 1), "categorical")
    with pytest.raises(SingularFactorError, match="condition number") as info:
        exact_tikhonov_inverse(f, 1e-16)
    assert "Increase the damping" in str(info.value)
    with pytest.warns(RuntimeWarning, match="condition number"):
        exact_tikhonov_inverse(f, 1e-12)
