"""The approximate inverses F̆⁻¹, F̂⁻¹, exact Tikhonov and the Appendix I solver (MATH.md §4, §5)."""

from __future__ import annotations

from types import SimpleNamespace

import oracle as O
import pytest
import torch

from kfac_lens import (
    BlockDiagonalInverse,
    BlockTridiagonalInverse,
    KroneckerSumInverse,
    block_diagonal_inverse,
    block_tridiagonal_inverse,
    exact_tikhonov_inverse,
    kronecker_factors,
    make_inverse,
    vec_to_mats,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Inverting damped factors at γ = 1e-3 has condition numbers up to ~1e6 here, so rounding reaches ~1e-11;
# at γ = 0.1 it stays near 1e-15.
TOL = {1e-3: 1e-9, 0.1: 1e-10}
N = 10
PROBLEMS = [("d2", "gaussian", None), ("d3", "categorical", None), ("d4", "bernoulli", None),
            ("d4", "gaussian", [0, 2]), ("d4", "categorical", [1, 2, 3])]


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
        if i != j:
            assert torch.equal(B, torch.zeros_like(B)), (i, j)
    check_operator_matches_dense(op, D, O.shapes(p.net, p.sel), tol)
    # F̆ itself: the diagonal blocks of damped F̃, exactly zero elsewhere
    Fb = op.dense_approximation()
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    for (i, j), B in blocks_of(Fb, szs).items():
        if i == j:
            assert O.rel(B, O.block(Ft, szs, i, i)) < 1e-13
        else:
            assert torch.equal(B, torch.zeros_like(B))
    assert O.rel(Fb @ D, torch.eye(D.shape[0], dtype=D.dtype)) < tol


@pytest.mark.parametrize("pi", ["trace", 1])
@pytest.mark.parametrize("gamma", [1e-3, 0.1])
@pytest.mark.parametrize("kind,family,layers", PROBLEMS)
def test_block_tridiagonal_inverse(kind, family, layers, gamma, pi):
    p = setup(kind, family, layers, gamma, pi)
    tol = TOL[gamma]
    op = block_tridiagonal_inverse(p.f, gamma, pi=pi)
    assert isinstance(op, BlockTridiagonalInverse) and op.layers == p.sel
    D = op.dense()
    assert O.rel(D, O.tridiag_inverse(p.Ad, p.Gd, p.sel)) < tol
    szs = O.sizes(p.net, p.sel)
    # F̂⁻¹ is block-tridiagonal: the other blocks are exactly 0
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
    """With ≥ 3 layers F̂ fills the off-tridiagonal blocks differently from F̃ (so the checks above bite)."""
    p = setup("d4", "categorical", None, 0.1, "trace")
    Fh = block_tridiagonal_inverse(p.f, 0.1).dense_approximation()
    Ft = O.kfac_dense(p.Ad, p.Gd, p.sel)
    szs = O.sizes(p.net, p.sel)
    assert O.rel(O.block(Fh, szs, 0, 2), O.block(Ft, szs, 0, 2)) > 1e-3
    assert O.rel(block_tridiagonal_inverse(p.f, 0.1).dense(), block_diagonal_inverse(p.f, 0.1).dense()) > 1e-3


def test_inverse_layer_subset_of_full_factors():
    """An inverse over layers=[0, 2] of all-layer factors equals the one from factors of those layers."""
    net = O.make_net("d4")
    X = O.make_inputs(net, N)
    full = kronecker_factors(net, X, "gaussian")
    sub = kronecker_factors(net, X, "gaussian", layers=[0, 2])
    for make in (block_diagonal_inverse, block_tridiagonal_inverse):
        a = make(full, 0.1, layers=[0, 2]).dense()
        b = make(sub, 0.1).dense()
        assert O.rel(a, b) < 1e-13
    A, G = O.kronecker_factors(net, X, "gaussian", [0, 2])
    Ad, Gd, _ = O.damp(A, G, [0, 2], 0.1)
    assert O.rel(block_tridiagonal_inverse(full, 0.1, layers=[0, 2]).dense(),
                 O.tridiag_inverse(Ad, Gd, [0, 2])) < 1e-10


def test_single_layer_tridiagonal_is_block_diagonal():
    net = O.make_net("d3")
    X = O.make_inputs(net, N)
    f = kronecker_factors(net, X, "categorical", layers=[1])
    assert O.rel(block_tridiagonal_inverse(f, 0.1).dense(), block_diagonal_inverse(f, 0.1).dense()) < 1e-13


def test_make_inverse_and_pairs_requirements():
    net = O.make_net("d3")
    X = O.make_inputs(net, N)
    f = kronecker_factors(net, X, "bernoulli", pairs="diag")
    bd = make_inverse("blockdiag", f, 0.1)
    assert isinstance(bd, BlockDiagonalInverse)
    full = kronecker_factors(net, X, "bernoulli")
    assert O.rel(bd.dense(), block_diagonal_inverse(full, 0.1).dense()) < 1e-13
    assert O.rel(bd.dense_approximation(), block_diagonal_inverse(full, 0.1).dense_approximation()) < 1e-13
    with pytest.raises(ValueError, match="pairs='tridiag'"):
        make_inverse("tridiag", f, 0.1)
    tri = kronecker_factors(net, X, "bernoulli", pairs="tridiag")
    assert O.rel(make_inverse("tridiag", tri, 0.1).dense(), block_tridiagonal_inverse(full, 0.1).dense()) < 1e-13
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
    assert O.rel(D, block_diagonal_inverse(f, xi ** 0.5).dense()) > 1e-3


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
        if abs(i - j) > 1:
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
    it must give the Cholesky path's inverse at every γ."""
    from kfac_lens.curvature.inverses import factor_eigs

    net = O.make_net("d3")
    fac = kronecker_factors(net, O.make_inputs(net, 40), "categorical")
    eigs = factor_eigs(fac)
    for g in (1e-3, 0.1, 3.0):
        a = block_diagonal_inverse(fac, g).dense()
        b = BlockDiagonalInverse(fac, g, eigs=eigs).dense()
        assert float((a - b).norm() / a.norm()) < 1e-10
