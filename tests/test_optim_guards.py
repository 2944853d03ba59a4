"""Guards against silently wrong K-FAC updates, checked against an independent dense computation.

Each test recomputes, from explicit formulas for a two-layer tanh network with a softmax output, what one
or two iterations of Algorithm 2 must produce, and fails on a specific way of getting it wrong:

- the factor statistics on the τ₁·m subset S₁ and the exact-F Gram products on the τ₂·m subset S₂ (not on
  the whole mini-batch), with the subsets replayed from the optimizer's seeded generator;
- the inverse refreshed from the factors *after* the EMA update (not stale ones);
- the default curvature estimator ("mc") backpropagating targets sampled from the model (not the training
  labels: that would give the empirical Fisher's factors).

The reference formulas (the optimizer's conventions: ā_k with a trailing 1, g_k = ∂L/∂s_k per case,
F = mean Jᵀ F_R J, vec column-major so that block (k, l) of F̃ is kron(Ā[k,l], G[k,l])):

    ā₀ = [x, 1], h = tanh(W̄₀ ā₀), ā₁ = [h, 1], z = W̄₁ ā₁, p = softmax(z), F_R = diag(p) − ppᵀ,
    B₀ = ∂z/∂s₀ = W₁ diag(1 − h²), B₁ = I,
    Ā[k,l] = mean ā_k ā_lᵀ,  G[k,l] = mean B_kᵀ F_R B_l  (exact expectation over y),
    ∇h_k = mean B_kᵀ (p − e_y) ā_kᵀ + η W̄_k,   (Jv)_n = Σ_k B_k V_k ā_k,   vᵀFw = mean (Jv)ᵀ F_R (Jw).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.optim import KFAC

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
ETA = 1e-5


def two_layer_problem(seed=0, n=64, d_in=4, hidden=6, classes=3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    return net, X, y


def weights(net) -> list[torch.Tensor]:
    """[W̄₀, W̄₁] with the bias as last column."""
    return [torch.cat([L.weight.detach(), L.bias.detach()[:, None]], dim=1).clone() for L in (net[0], net[2])]


# --------------------------------------------------------------------------------------------- reference
def ref_pass(W, x):
    """Per-case ā_k, B_k = ∂z/∂s_k and p for the two-layer tanh network with weights W = [W̄₀, W̄₁]."""
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    a0 = torch.cat([x, ones], dim=1)
    h = torch.tanh(a0 @ W[0].T)
    a1 = torch.cat([h, ones], dim=1)
    p = torch.softmax(a1 @ W[1].T, dim=1)
    B0 = W[1][:, :-1][None] * (1 - h * h)[:, None, :]  # (n, C, hidden)
    B1 = torch.eye(p.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    return [a0, a1], [B0, B1], p


def output_fisher(p):
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def ref_factors(W, x, y=None):
    """Exact-expectation factors (y None) or the empirical ones (training labels y): dicts keyed (k, l)."""
    a, B, p = ref_pass(W, x)
    if y is None:
        FR = output_fisher(p)
        G = {(k, l): torch.einsum("nci,ncd,ndj->ij", B[k], FR, B[l]).contiguous() / x.shape[0]
             for k in (0, 1) for l in (0, 1)}  # (contiguous: torch.kron rejects some einsum layouts)
    else:
        r = p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
        g = [torch.einsum("nci,nc->ni", B[k], r) for k in (0, 1)]
        G = {(k, l): g[k].T @ g[l] / x.shape[0] for k in (0, 1) for l in (0, 1)}
    A = {(k, l): a[k].T @ a[l] / x.shape[0] for k in (0, 1) for l in (0, 1)}
    return A, G


def ref_gradient(W, x, y, eta=ETA):
    a, B, p = ref_pass(W, x)
    r = p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return [torch.einsum("nci,nc,nj->ij", B[k], r, a[k]) / x.shape[0] + eta * W[k] for k in (0, 1)]


def ref_gram(W, x, vecs):
    """[v_iᵀ F v_j] of the exact Fisher on x, F = mean Jᵀ F_R J."""
    a, B, p = ref_pass(W, x)
    FR = output_fisher(p)
    Jv = [sum(torch.einsum("nci,ij,nj->nc", B[k], V[k], a[k]) for k in (0, 1)) for V in vecs]
    return torch.stack([torch.stack([torch.einsum("nc,ncd,nd->", Ji, FR, Jj) / x.shape[0] for Jj in Jv])
                        for Ji in Jv])


def dot(u, v):
    return sum((a * b).sum() for a, b in zip(u, v))


def vec(M):
    return M.T.reshape(-1)  # column-major: kron(A, G) vec(V) = vec(G V Aᵀ)


def unvec(v, shape):
    return v.reshape(shape[1], shape[0]).T


def ref_direction(A, G, gamma, grad, inverse):
    """Δ = −F̃_damped⁻¹ ∇h by a dense solve: block-diagonal F̆, or, for two layers, the block-tridiagonal F̂,
    which then is the whole damped F̃ (Section 3.3: F̂ agrees with it on the tridiagonal blocks)."""
    shapes = [t.shape for t in grad]
    damped_A, damped_G = dict(A), dict(G)
    for k in (0, 1):
        pi = math.sqrt((torch.trace(A[k, k]) / A[k, k].shape[0]) / (torch.trace(G[k, k]) / G[k, k].shape[0]))
        damped_A[k, k] = A[k, k] + pi * gamma * torch.eye(A[k, k].shape[0], dtype=F64)
        damped_G[k, k] = G[k, k] + gamma / pi * torch.eye(G[k, k].shape[0], dtype=F64)
    pairs = [(0, 1), (1, 0)] if inverse == "tridiag" else []
    blocks = [[torch.kron(damped_A[k, l], damped_G[k, l]) if (k == l or (k, l) in pairs)
               else torch.zeros(shapes[k].numel(), shapes[l].numel(), dtype=F64) for l in (0, 1)] for k in (0, 1)]
    Ft = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    u = torch.linalg.solve(Ft, torch.cat([vec(g) for g in grad]))
    n0 = shapes[0].numel()
    return [-unvec(u[:n0], shapes[0]), -unvec(u[n0:], shapes[1])]


def ref_combine(W, x2, grad, Delta, delta0, damping):
    """(α, μ) minimising M(αΔ + μδ₀) = ½ cᵀ(Gram_F + ξ Gram_I)c + bᵀc over span{Δ, δ₀} (E.4, F)."""
    vecs = [Delta] if delta0 is None else [Delta, delta0]
    gram_F = ref_gram(W, x2, vecs)
    gram_I = torch.tensor([[float(dot(u, v)) for v in vecs] for u in vecs], dtype=F64)
    b = torch.tensor([float(dot(grad, v)) for v in vecs], dtype=F64)
    Q = gram_F + damping * gram_I
    c = torch.linalg.solve(Q, -b)
    M = float(0.5 * c @ Q @ c + b @ c)
    alpha, mu = float(c[0]), (float(c[1]) if delta0 is not None else 0.0)
    delta = [alpha * D for D in Delta]
    if delta0 is not None:
        delta = [d + mu * d0 for d, d0 in zip(delta, delta0)]
    return alpha, mu, M, delta


def replay_subsets(seed, m, tau1, tau2, n_steps):
    """S₁, S₂ of each iteration, from a generator seeded like the optimizer's: with the exact estimator
    nothing else draws from it, and each iteration draws S₁ (Appendix D) before S₂ (E.4)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        subsets = []
        for tau in (tau1, tau2):
            size = max(1, math.ceil(tau * m))
            subsets.append(torch.arange(m) if size >= m else torch.randperm(m, generator=g)[:size])
        out.append(tuple(subsets))
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def assert_close(actual, expected, rtol=1e-9, what=""):
    err = rel(actual, expected)
    assert err < rtol, f"{what}: relative error {err:.3g}"


# --------------------------------------------------------------------------------------------- τ₁, τ₂, EMA
@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_two_iterations_match_a_dense_recomputation_on_the_drawn_subsets(inverse):
    """Iterations 1 and 2 (exact curvature, τ₁ = 1/8, τ₂ = 1/4): the factors are the statistics of S₁
    only, EMA-averaged (ε = 1/2 at k = 2); Δ = −F̃⁻¹∇h uses the post-EMA factors; α, μ and M(δ) come from
    the exact F on S₂ only. Sanity checks show each wrong choice would move the numbers far beyond the
    tolerance."""
    net, X, y = two_layer_problem()
    m, tau1, tau2, seed, lam = 32, 1 / 8, 1 / 4, 7, 0.5
    opt = KFAC(net, "categorical", inverse, curvature_estimator="exact", tau1=tau1, tau2=tau2, seed=seed,
               lambda_init=lam, eta=ETA, T1=100)
    gamma = opt.gamma
    subsets = replay_subsets(seed, m, tau1, tau2, 2)
    xs, ys = [X[:m], X[m:]], [y[:m], y[m:]]
    ema = None
    delta0 = None
    for k in (1, 2):
        x, yb = xs[k - 1], ys[k - 1]
        S1, S2 = subsets[k - 1]
        W = weights(net)
        A_new, G_new = ref_factors(W, x[S1])
        if ema is None:
            ema_prev, ema = None, (A_new, G_new)
        else:
            ema_prev = ema
            ema = tuple({kl: 0.5 * old[kl] + 0.5 * new[kl] for kl in old} for old, new in zip(ema, (A_new, G_new)))
        A, G = ema
        grad = ref_gradient(W, x, yb)
        Delta = ref_direction(A, G, gamma, grad, inverse)
        alpha, mu, M, delta = ref_combine(W, x[S2], grad, Delta, delta0, lam + ETA)

        st = opt.step(x, yb)
        actual = [a - b for a, b in zip(weights(net), W)]

        # factor statistics on S₁ (and not on the whole mini-batch)
        A_all, G_all = ref_factors(W, x)
        for kl in opt.factors.pairs:
            assert_close(opt.factors.A[kl], A[kl], 1e-12, f"k={k} Ā{kl}")
            assert_close(opt.factors.G[kl], G[kl], 1e-12, f"k={k} G{kl}")
            if k == 1:  # the whole batch is far off
                assert rel(A_all[kl], A[kl]) > 1e-2 or rel(G_all[kl], G[kl]) > 1e-2
        assert rel(G_all[0, 0], G_new[0, 0]) > 1e-2 and rel(G_all[1, 1], G_new[1, 1]) > 1e-2
        # the update, its coefficients and M(δ), from the exact F on S₂
        assert st["alpha"] == pytest.approx(alpha, rel=1e-9)
        assert st["mu"] == pytest.approx(mu, rel=1e-9, abs=1e-15)
        assert st["M"] == pytest.approx(M, rel=1e-9)
        for d, e in zip(actual, delta):
            assert_close(d, e, 1e-8, f"k={k} δ")
        # what the wrong subsets / stale factors would have given: clearly different
        alpha_all = ref_combine(W, x, grad, Delta, delta0, lam + ETA)[0]
        assert abs(alpha_all - alpha) > 1e-3 * abs(alpha)
        if ema_prev is not None:
            stale = ref_combine(W, x[S2], grad, ref_direction(*ema_prev, gamma, grad, inverse), delta0, lam + ETA)[3]
            assert max(rel(s, e) for s, e in zip(stale, delta)) > 1e-3
        if k == 2:
            assert mu != 0.0  # momentum was in play
        delta0 = actual


def _live_inverse_reference(factors, gamma, inverse, V):
    A = {kl: factors.A[kl] for kl in factors.pairs}
    G = {kl: factors.G[kl] for kl in factors.pairs}
    if inverse == "tridiag":
        A[1, 0], G[1, 0] = A[0, 1].T, G[0, 1].T
    return [-u for u in ref_direction(A, G, gamma, V, inverse)]


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_live_inverse_is_built_from_the_post_ema_factors(inverse):
    """At every refresh iteration (k ≤ 3, k ≡ 0 mod T₃; a γ search at k ≡ 0 mod T₂) the live inverse is
    F̃⁻¹ of the factors *after* that iteration's EMA update, damped with the chosen γ; in between it stays
    the one of the last refresh. Default (sampled-target) curvature."""
    net, X, y = two_layer_problem()
    opt = KFAC(net, "categorical", inverse, lambda_init=0.5, T1=2, T2=4, T3=2, seed=1)
    g = torch.Generator().manual_seed(3)
    V = [torch.randn(6, 5, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)]
    built_from = None
    for k in range(1, 9):
        before = opt.factors.clone() if opt.factors is not None else None
        idx = torch.randperm(64, generator=g)[:32]
        st = opt.step(X[idx], y[idx])
        refresh = k <= 3 or k % 2 == 0
        assert st["inverse_refreshed"] == refresh
        if refresh:
            built_from = (opt.factors.clone(), opt.gamma)
            if before is not None:  # the pre-EMA factors would be a clearly different inverse
                stale = _live_inverse_reference(before, opt.gamma, inverse, V)
                fresh = _live_inverse_reference(*built_from, inverse, V)
                assert max(rel(s, f) for s, f in zip(stale, fresh)) > 1e-3
        assert opt.inverse.gamma == built_from[1]
        expected = _live_inverse_reference(*built_from, inverse, V)
        for u, e in zip(opt.inverse.apply(V), expected):
            assert_close(u, e, 1e-9, f"k={k}")


# --------------------------------------------------------------------------------------------- sampled targets
def confident_problem(seed, n=4000):
    """A confident network (mean max softmax probability 0.79–0.94 over seeds 0–19) and labels drawn
    independently of it, so that the empirical Fisher (training labels) is far from the true one (targets
    sampled from the model)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    with torch.no_grad():
        net[2].weight.mul_(15.0)
    g = torch.Generator().manual_seed(seed + 100)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, X, y


# Limits on ‖G_opt − G_exact‖_F / ‖G_exact‖_F for the diagonal blocks. Over seeds 0–19 (both blocks) the
# sampled-target estimate was at most 0.11 from the exact one (tr ratio 0.915–1.10), the empirical G at
# least 2.45 (tr ratio ≥ 3.5).
MC_TOL = 0.3
EMPIRICAL_MIN = 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_default_curvature_samples_targets_from_the_model(seed):
    """τ₁ = 1 on 4000 cases: the default ("mc") factors G are statistically close to the exact-expectation
    G, and far from the empirical G of the training labels (a confident model with labels that disagree)."""
    net, X, y = confident_problem(seed)
    W = weights(net)
    A_ex, G_ex = ref_factors(W, X)
    _, G_emp = ref_factors(W, X, y)
    # the library's own exact estimator agrees with the reference formulas
    lib = K.kronecker_factors(net, X, "categorical", estimator="exact", pairs="diag")
    opt = KFAC(net, "categorical", tau1=1.0, tau2=1 / 64, seed=seed)
    assert opt.curvature_estimator == "mc"
    opt.step(X, y)
    for k in (0, 1):
        assert_close(lib.G[k, k], G_ex[k, k], 1e-12, "reference G")
        assert rel(G_emp[k, k], G_ex[k, k]) > 2 * EMPIRICAL_MIN  # the setup tells the two apart
        G = opt.factors.G[k, k]
        err = rel(G, G_ex[k, k])
        assert err < MC_TOL, f"G[{k},{k}] is {err:.3g} from the exact-expectation G (training labels used?)"
        assert float((G - G_emp[k, k]).norm() / G_ex[k, k].norm()) > EMPIRICAL_MIN
        assert 0.75 < float(torch.trace(G) / torch.trace(G_ex[k, k])) < 1.33
        assert_close(opt.factors.A[k, k], A_ex[k, k], 1e-12, f"Ā[{k},{k}]")  # no targets in Ā


def test_a_doubled_output_link_warns_at_construction():
    """A network ending in Softmax trained with the categorical likelihood would apply softmax twice."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="applied twice"):
        KFAC(net, "categorical")


def ill_conditioned_float32_problem(n=256, seed=0, collinear=1e-4):
    """A float32 network whose first-layer input has two nearly collinear features (exactly collinear for
    ``collinear=0``), so Ā₀ + πγI has a condition number above float32's limit (1/(100·eps) ≈ 8.4e4) for
    small γ, above float64's (≈ 4.5e13) for tiny γ, and below both for large γ."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g)
    X = torch.cat([x, x[:, :1] + collinear * torch.randn(n, 1, generator=g)], dim=1) * 30
    y = torch.randint(0, 3, (n,), generator=g)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return net, X, y


def first_factors(net, X, y):
    """The float32 factors K-FAC builds its first inverse from (exact estimator on every case, no EMA yet),
    read from an optimizer run one step on a copy of the network: a threshold computed from them is the
    one K-FAC meets, whatever rounding another route to the same factors would take."""
    opt = KFAC(copy.deepcopy(net), "categorical", "blockdiag", gamma_init=1.0, lambda_init=1.0, adapt_gamma=False,
               curvature_estimator="exact", tau1=1.0, seed=0)
    opt.step(X, y)
    return opt.factors


def refused_in(factors, gamma, dtype) -> bool:
    """Whether the block-diagonal inverse of the damped (float32) ``factors``, inverted in ``dtype``, is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", K.IllConditionedWarning)
            K.block_diagonal_inverse(factors.to(dtype), gamma)
    except K.SingularFactorError:
        return True
    return False


def refusal_threshold(factors, dtype, lo, hi=1e3) -> float:
    """The γ below which ``dtype`` cannot invert the damped float32 factors, by bisection on log γ."""
    assert refused_in(factors, lo, dtype) and not refused_in(factors, hi, dtype)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if refused_in(factors, mid, dtype) else (lo, mid)
    return hi


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_float32_model_keeps_candidates_only_float64_can_invert(inverse):
    """A γ candidate too ill-conditioned for a float32 inverse is built in float64 (and applied to the float32
    gradients), not left out of the search and not warned about (Appendix E.6 keeps every candidate)."""
    net, X, y = ill_conditioned_float32_problem()
    f = first_factors(net, X, y)
    gamma = 0.5 * refusal_threshold(f, torch.float32, 1e-8)
    assert refused_in(f, gamma, torch.float32) and not refused_in(f, gamma, torch.float64)
    opt = KFAC(net, "categorical", inverse, gamma_init=gamma, lambda_init=1.0, adapt_gamma=False, T3=1,
               curvature_estimator="exact", tau1=1.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # neither "left out", "γ raised" nor "nearly singular"
        for _ in range(3):
            stats = opt.step(X, y)
    assert stats["gamma"] == gamma  # not raised to float32's limit
    assert opt.inverse.A_inv[0].dtype == torch.float64
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


def test_gamma_search_leaves_out_candidates_float64_cannot_invert():
    """(Block-tridiagonal; the block-diagonal search builds every candidate's inverse the same way.)"""
    inverse = "tridiag"
    net, X, y = ill_conditioned_float32_problem(collinear=0.0)
    omega2 = 0.5
    f = first_factors(net, X, y)
    threshold = refusal_threshold(f, torch.float64, 1e-20)
    # a γ that float64 can invert, whose ω₂γ candidate it cannot (checked here, on K-FAC's first factors)
    gamma = 1.05 * threshold
    assert not refused_in(f, gamma, torch.float64) and refused_in(f, omega2 * gamma, torch.float64)
    opt = KFAC(net, "categorical", inverse, gamma_init=gamma, lambda_init=1.0, T2=1, T3=1, omega2=omega2,
               curvature_estimator="exact", tau1=1.0, seed=0)
    with pytest.warns(RuntimeWarning, match="left out of the γ search"):
        for _ in range(4):
            opt.step(X, y)
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_gamma_is_raised_when_no_candidate_can_be_inverted(inverse):
    net, X, y = ill_conditioned_float32_problem(collinear=0.0)
    threshold = refusal_threshold(first_factors(net, X, y), torch.float64, 1e-20)
    gamma, omega2 = threshold / 1e3, math.sqrt(19 / 20) ** 20
    expected = gamma * omega2 ** -math.ceil(math.log(threshold / gamma) / math.log(1 / omega2))
    opt = KFAC(net, "categorical", inverse, gamma_init=gamma, lambda_init=1.0, adapt_gamma=False,
               curvature_estimator="exact", tau1=1.0, seed=0)
    with pytest.warns(RuntimeWarning, match="γ raised to"):
        opt.step(X, y)
    assert opt.gamma == pytest.approx(expected, rel=1e-9)
