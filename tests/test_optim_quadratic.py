"""K-FAC's quadratic model (docs/math.md §7; Appendices E.4, F, J) against dense float64 computations.

- the re-scaled update α*Δ and the momentum update α*Δ + μ*δ₀ minimise M over span{Δ, δ₀} with the
  exact mini-batch F, and M(δ*) = ½∇hᵀδ*;
- the Appendix J scalars from ``fisher_gram`` equal uᵀFv with the dense exact F;
- Appendix F remark: on a quadratic h with exact deterministic curvature, K-FAC with momentum is
  preconditioned linear CG.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.optim import KFAC

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
FAMILIES = ("categorical", "bernoulli", "gaussian")


def make_net(sizes, seed=0, device="cpu", scale=1.0):
    torch.manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.Tanh())
    net = nn.Sequential(*mods).to(device=device, dtype=F64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def make_data(family, n, d_in, C, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    if family == "categorical":
        y = torch.randint(0, C, (n,), generator=g)
    elif family == "bernoulli":
        y = torch.rand(n, C, generator=g, dtype=F64)
    else:
        y = torch.randn(n, C, generator=g, dtype=F64)
    return X.to(device), y.to(device)


def theta(net):
    return K.mats_to_vec(K.NetworkView(net).weight_matrices())


def objective(net, X, y, family, eta):
    lik = K.get_likelihood(family)
    h = lik.nll(net(X), y)
    return h + 0.5 * eta * sum((p * p).sum() for p in net.parameters())


def grad_h(net, X, y, family, eta):
    """∇h = ∇(mean NLL) + ηθ by autograd, in the paper layout."""
    net = copy.deepcopy(net)
    h = objective(net, X, y, family, eta)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    gs = torch.autograd.grad(h, [p for m in lins for p in (m.weight, m.bias)])
    mats = [torch.cat([gs[2 * i], gs[2 * i + 1][:, None]], dim=1) for i in range(len(lins))]
    return K.mats_to_vec(mats)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def dense_subspace(F, g, V, damping):
    """Q = VᵀFV + ξVᵀV, b = Vᵀ∇h; returns (c* = −Q⁻¹b, M(c*), Q, b)."""
    Q = V.T @ F @ V + damping * (V.T @ V)
    b = V.T @ g
    c = -torch.linalg.solve(Q, b)
    return c, float(0.5 * c @ Q @ c + b @ c), Q, b


# --------------------------------------------------------------------------------------------- α*, (α*, μ*)
@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rescale_and_momentum_minimise_the_dense_quadratic_model(family, inverse, device):
    sizes = [5, 6, 4, 3]
    net = make_net(sizes, device=device)
    X, y = make_data(family, 30, 5, 3, device=device)
    lam, eta = 0.3, 1e-3
    opt = KFAC(net, family, inverse, lambda_init=lam, eta=eta, seed=0)
    for s in range(2):
        opt.step(X[10 * s:10 * s + 12], y[10 * s:10 * s + 12])
    assert opt.delta0 is not None
    x, t = X[5:25], y[5:25]
    th0 = theta(net).clone()

    F = K.exact_fisher(net, x, family)
    g = grad_h(net, x, t, family, eta)
    d0 = K.mats_to_vec(opt.delta0)
    xi = opt.lam + eta
    assert opt.lam == lam  # k < T1: λ is still the initial one

    # Δ = −F̃⁻¹∇h with the optimizer's current (damped) approximate inverse, densely.
    P_inv = opt.inverse.dense()

    # --- re-scaling only (Appendix E.4)
    p1 = opt.propose(x, t, momentum=False)
    D = K.mats_to_vec(p1.Delta)
    assert rel(D, -P_inv @ g) < 1e-10
    c, M, _Q, _b = dense_subspace(F, g, D[:, None], xi)
    alpha_formula = float(-(g @ D) / (D @ F @ D + xi * (D @ D)))
    assert p1.alpha == pytest.approx(alpha_formula, rel=1e-10)
    assert p1.alpha == pytest.approx(float(c[0]), rel=1e-10)
    assert p1.mu == 0.0
    assert p1.M == pytest.approx(M, rel=1e-10)
    assert p1.M < 0
    assert rel(K.mats_to_vec(p1.delta), p1.alpha * D) < 1e-13
    # M(δ*) = ½ ∇hᵀδ* at the optimum
    assert p1.M == pytest.approx(0.5 * float(g @ K.mats_to_vec(p1.delta)), rel=1e-10)
    # M computed directly on δ with the full dense matrix
    delta = K.mats_to_vec(p1.delta)
    assert p1.M == pytest.approx(float(0.5 * delta @ (F @ delta) + 0.5 * xi * delta @ delta + g @ delta),
                                 rel=1e-10)

    # --- re-scaling with momentum (Appendix F): (α*, μ*) jointly
    p2 = opt.propose(x, t)
    assert rel(K.mats_to_vec(p2.Delta), D) < 1e-13
    c2, M2, _Q2, _b2 = dense_subspace(F, g, torch.stack([D, d0], dim=1), xi)
    assert p2.alpha == pytest.approx(float(c2[0]), rel=1e-9)
    assert p2.mu == pytest.approx(float(c2[1]), rel=1e-9)
    assert abs(p2.mu) > 1e-6  # momentum is actually used
    assert p2.M == pytest.approx(M2, rel=1e-10)
    delta2 = K.mats_to_vec(p2.delta)
    assert rel(delta2, p2.alpha * D + p2.mu * d0) < 1e-12
    assert p2.M == pytest.approx(0.5 * float(g @ delta2), rel=1e-10)
    # the 2-d optimum is no worse than the 1-d one, and it is a stationary point of M over the span
    assert p2.M <= p1.M + 1e-14
    grad_M = (F + xi * torch.eye(F.shape[0], dtype=F64, device=F.device)) @ delta2 + g
    assert abs(float(grad_M @ D)) < 1e-9 * float(g.norm() * D.norm())
    assert abs(float(grad_M @ d0)) < 1e-9 * float(g.norm() * d0.norm())

    # --- no re-scaling: α = 1, μ = 0, M = M(Δ)
    p3 = opt.propose(x, t, rescale=False)
    assert p3.alpha == 1.0 and p3.mu == 0.0
    assert p3.M == pytest.approx(float(0.5 * D @ (F @ D) + 0.5 * xi * D @ D + g @ D), rel=1e-10)
    assert rel(K.mats_to_vec(p3.delta), D) < 1e-15

    # --- the improvement h(θ) − h(θ + δ) and no side effects on θ
    assert torch.equal(theta(net), th0)
    with torch.no_grad():
        h0 = float(objective(net, x, t, family, eta))
        K.NetworkView(net).add_to_weights(p2.delta)
        h1 = float(objective(net, x, t, family, eta))
        K.NetworkView(net).add_to_weights(p2.delta, alpha=-1.0)
    assert p2.improvement == pytest.approx(h0 - h1, rel=1e-9, abs=1e-13)

    # --- lam= and gamma= overrides enter M and Δ as documented
    p4 = opt.propose(x, t, lam=2.0, momentum=False)
    c4, M4, _, _ = dense_subspace(F, g, D[:, None], 2.0 + eta)
    assert p4.alpha == pytest.approx(float(c4[0]), rel=1e-10) and p4.M == pytest.approx(M4, rel=1e-10)
    p5 = opt.propose(x, t, gamma=3.0 * opt.gamma, momentum=False)
    D5 = K.mats_to_vec(p5.Delta)
    inv5 = K.make_inverse(inverse, opt.factors, 3.0 * opt.gamma)
    assert rel(D5, -inv5.dense() @ g) < 1e-10
    assert rel(D5, D) > 1e-3


def test_step_uses_the_same_update_as_propose():
    """With τ₂ = 1 and no inverse refresh, step's δ, α, μ and M are those of propose on the same batch."""
    net = make_net([4, 5, 3])
    X, y = make_data("categorical", 24, 4, 3)
    opt = KFAC(net, "categorical", "tridiag", lambda_init=0.5, eta=1e-3, tau2=1.0, seed=3)
    for _ in range(3):
        opt.step(X, y)
    prop = opt.propose(X, y)
    th0 = theta(net).clone()
    stats = opt.step(X, y)  # k = 4: no refresh (T3 = 20), no γ search, no λ update
    assert stats["iteration"] == 4 and not stats["inverse_refreshed"]
    assert stats["alpha"] == pytest.approx(prop.alpha, rel=1e-12)
    assert stats["mu"] == pytest.approx(prop.mu, rel=1e-12)
    assert stats["M"] == pytest.approx(prop.M, rel=1e-12)
    assert rel(theta(net) - th0, K.mats_to_vec(prop.delta)) < 1e-12
    assert rel(K.mats_to_vec(opt.delta0), K.mats_to_vec(prop.delta)) < 1e-12


@pytest.mark.parametrize("eta", [0.0, 0.05])
def test_low_rank_trick_equals_dense_blockdiag_inverse(eta, monkeypatch):
    """Appendix G: layers wider than the batch use (G⁻¹ gᵀ)(a Ā⁻¹); Δ must still be −F̆⁻¹∇h (incl. ηθ)."""
    net = make_net([8, 10, 9, 3])
    X, y = make_data("categorical", 30, 8, 3)
    used = []
    low_rank_apply = K.BlockDiagonalInverse.apply_low_rank

    def spy(self, i, *a):
        used.append(i)
        return low_rank_apply(self, i, *a)

    monkeypatch.setattr(K.BlockDiagonalInverse, "apply_low_rank", spy)
    outs = {}
    for low_rank in (True, False):
        n = copy.deepcopy(net)
        opt = KFAC(n, "categorical", "blockdiag", eta=eta, lambda_init=1.0, low_rank=low_rank, seed=0)
        opt.step(X, y)
        used.clear()
        x, t = X[:3], y[:3]  # m = 3: m(d + D) < dD for the two wide layers
        p = opt.propose(x, t, momentum=False)
        assert used == ([0, 1] if low_rank else [])
        D = K.mats_to_vec(p.Delta)
        assert rel(D, -opt.inverse.dense() @ grad_h(n, x, t, "categorical", eta)) < 1e-10
        outs[low_rank] = D
    assert rel(outs[True], outs[False]) < 1e-10


# --------------------------------------------------------------------------------------------- Appendix J
@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_gram_equals_dense_quadratic_forms(family, device):
    net = make_net([4, 5, 3], seed=2, device=device, scale=1.5)
    X, _ = make_data(family, 17, 4, 3, device=device)
    F = K.exact_fisher(net, X, family)
    P = F.shape[0]
    g = torch.Generator().manual_seed(5)
    u = torch.randn(P, generator=g, dtype=F64).to(device)
    v = torch.randn(P, generator=g, dtype=F64).to(device)
    G = K.fisher_gram(net, X, family, [u, v])
    ref = torch.stack([torch.stack([u @ F @ u, u @ F @ v]), torch.stack([v @ F @ u, v @ F @ v])])
    assert G.shape == (2, 2)
    assert rel(G, ref) < 1e-12
    assert torch.equal(G, G.T)
    # per-layer matrices give the same as flat vectors
    shapes = K.NetworkView(net).shapes()
    G2 = K.fisher_gram(net, X, family, [K.vec_to_mats(u, shapes), K.vec_to_mats(v, shapes)])
    assert rel(G2, ref) < 1e-12


# ----------------------------------------------------------------------------------------- Appendix F ⇔ PCG
def test_kfac_momentum_on_a_quadratic_is_preconditioned_cg():
    """h = ½‖W ā − y‖² averaged (one Linear, Gaussian likelihood) is exactly quadratic with Hessian F = Ā ⊗ I.

    With exact curvature, λ = η = 0 and fixed γ, the damped F̃ (hence the preconditioner) is constant, and
    (α, μ) minimising h over θ_k + span{Δ_k, δ_{k−1}} reproduce PCG's iterates exactly.
    """
    d_in, C, N = 6, 3, 40
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_in, C)).to(F64)
    spread = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.1], dtype=F64)
    X = torch.randn(N, d_in, generator=g, dtype=F64) * spread + 0.3
    Y = torch.randn(N, C, generator=g, dtype=F64)
    opt = KFAC(net, "gaussian", "blockdiag", curvature_estimator="exact", tau1=1, tau2=1, lambda_init=0,
               eta=0, gamma_init=0.05, adapt_gamma=False, adapt_lambda=False, T2=1000, T3=1000,
               momentum=True, rescale=True)
    H = K.exact_fisher(net, X, "gaussian")
    th0 = theta(net).clone()
    g0 = grad_h(net, X, Y, "gaussian", 0.0)
    # Sanity: h is quadratic with Hessian F, so ∇h(θ) = ∇h(θ₀) + F(θ − θ₀).
    pert = 0.1 * torch.randn(th0.shape, generator=g, dtype=F64)
    moved = copy.deepcopy(net)
    K.NetworkView(moved).add_to_weights(K.vec_to_mats(pert, K.NetworkView(net).shapes()))
    assert rel(grad_h(moved, X, Y, "gaussian", 0.0), g0 + H @ pert) < 1e-12

    iters = 5  # < 7 distinct eigenvalues of P⁻¹F, so CG has not converged yet
    kfac = [th0]
    for k in range(iters):
        stats = opt.step(X, Y)
        assert stats["gamma"] == 0.05 and stats["lambda"] == 0.0
        if k == 0:
            assert stats["mu"] == 0.0
        else:
            assert stats["mu"] != 0.0
        kfac.append(theta(net).clone())

    P_inv = opt.inverse.dense()
    # The preconditioner is the damped F̃⁻¹ built from Ā ⊗ I (G = I): check it is constant and SPD.
    P_inv_1 = K.make_inverse("blockdiag", K.kronecker_factors(net, X, "gaussian", pairs="diag"), 0.05).dense()
    assert rel(P_inv, P_inv_1) < 1e-12
    x, r = th0.clone(), -g0
    z = P_inv @ r
    p = z.clone()
    cg = [x.clone()]
    for _ in range(iters):
        Hp = H @ p
        a = (r @ z) / (p @ Hp)
        x = x + a * p
        r_new = r - a * Hp
        z_new = P_inv @ r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
        cg.append(x.clone())
    for k in range(1, iters + 1):
        assert rel(kfac[k] - th0, cg[k] - th0) < 1e-8, k
    # CG really is making progress along different directions (not trivially converged after one step)
    assert rel(cg[2] - th0, cg[1] - th0) > 1e-2 and rel(cg[iters] - th0, cg[iters - 1] - th0) > 1e-6
    # ... and plain re-scaled steps without momentum are *not* CG (the test can tell them apart)
    net2 = nn.Sequential(nn.Linear(d_in, C)).to(F64)
    K.NetworkView(net2).set_weight_matrices(K.vec_to_mats(th0, K.NetworkView(net).shapes()))
    opt2 = KFAC(net2, "gaussian", "blockdiag", curvature_estimator="exact", tau1=1, tau2=1, lambda_init=0,
                eta=0, gamma_init=0.05, adapt_gamma=False, adapt_lambda=False, T2=1000, T3=1000,
                momentum=False)
    for _ in range(3):
        opt2.step(X, Y)
    assert rel(theta(net2) - th0, cg[3] - th0) > 1e-4


def test_subspace_model_minimiser_and_degenerate_momentum():
    from kfac_lens.optim import SubspaceModel, alpha_star

    gF = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    gI = torch.tensor([[1.0, 0.2], [0.2, 3.0]], dtype=F64)
    b = torch.tensor([-1.0, 0.4], dtype=F64)
    sub = SubspaceModel(gF, gI, b, 0.1)
    c = sub.minimize()
    Q = gF + 0.1 * gI
    assert torch.allclose(c, -torch.linalg.solve(Q, b), rtol=1e-14)
    assert sub.value(c) == pytest.approx(0.5 * float(b @ c), rel=1e-14)
    assert sub.value(c) < sub.value(c + torch.tensor([1e-3, 0.0], dtype=F64))
    assert alpha_star(2.0, 1.0, -1.0, 0.1) == pytest.approx(1.0 / 2.1)
    # δ₀ = 0 (all-zero second direction): fall back to α* alone, μ = 0
    gF0 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    gI0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    c0 = SubspaceModel(gF0, gI0, torch.tensor([-1.0, 0.0], dtype=F64), 0.1).minimize()
    assert c0.tolist() == pytest.approx([1.0 / 2.1, 0.0])
    # δ₀ ∥ Δ (singular 2×2 model): same fallback
    v = torch.tensor([1.0, 2.0], dtype=F64)
    cp = SubspaceModel(2.0 * torch.outer(v, v), torch.outer(v, v), -v, 0.1).minimize()
    assert cp[1] == 0.0 and cp[0] == pytest.approx(1.0 / 2.1)
    # no positive curvature along Δ: a clear error
    with pytest.raises(ValueError, match="curvature"):
        SubspaceModel(torch.zeros(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64), -torch.ones(1, dtype=F64),
                      0.0).minimize()
