"""The adaptation rules and schedules (docs/math.md §8; Appendices D, E.5, E.6, G, H, M), alone and inside KFAC."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.optim import (
    KFAC,
    ema_decay,
    exponential_batch_sizes,
    gamma_candidates,
    levenberg_marquardt,
    sutskever_momentum,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def small_problem(n=64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, X, y


def batches(X, y, n_steps, m=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        idx = torch.randperm(X.shape[0], generator=g)[:m]
        yield X[idx], y[idx]


def objective(net, X, y, eta):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(net(X), y)
                     + 0.5 * eta * sum((p * p).sum() for p in net.parameters()))


# --------------------------------------------------------------------------------------------- pure rules
def test_levenberg_marquardt_rule():
    w = 0.95 ** 5
    assert levenberg_marquardt(10.0, 0.9, w) == 10.0 * w
    assert levenberg_marquardt(10.0, 0.5, w) == 10.0
    assert levenberg_marquardt(10.0, 0.1, w) == 10.0 / w
    assert levenberg_marquardt(10.0, float("nan"), w) == 10.0 / w
    assert levenberg_marquardt(10.0, -3.0, w) == 10.0 / w  # the step made h worse
    assert levenberg_marquardt(10.0, 0.75, w) == 10.0  # boundaries are strict inequalities
    assert levenberg_marquardt(10.0, 0.25, w) == 10.0
    assert levenberg_marquardt(10.0, 5.0, w) == 10.0 * w
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError):
            levenberg_marquardt(1.0, 0.9, bad)


def test_gamma_candidates_and_ema_decay():
    w2 = math.sqrt(19 / 20) ** 20
    assert gamma_candidates(2.0, w2) == [2.0, 2.0 * w2, 2.0 / w2]
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError):
            gamma_candidates(2.0, bad)
    assert ema_decay(1) == 0.0
    assert ema_decay(2) == 0.5
    assert ema_decay(10) == pytest.approx(0.9)
    assert ema_decay(20) == 0.95 and ema_decay(21) == 0.95 and ema_decay(10 ** 6) == 0.95
    assert ema_decay(10, eps_max=0.5) == 0.5


def test_exponential_batch_sizes():
    N = 60000
    m = exponential_batch_sizes(1000, N)
    assert m(1) == 1000
    assert m(500) == N and m(501) == N and m(5000) == N
    sizes = [m(k) for k in range(1, 501)]
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    assert sizes[-2] < N
    b = 499 / math.log(N / 1000)
    assert m(250) == round(1000 * math.exp(249 / b))
    assert exponential_batch_sizes(1000, 300)(1) == 300  # m₁ capped at |S|
    assert exponential_batch_sizes(10, 1000, full_at=50)(50) == 1000
    with pytest.raises(ValueError):
        exponential_batch_sizes(0, 10)
    with pytest.raises(ValueError):
        exponential_batch_sizes(10, 100, full_at=1)


def test_sutskever_momentum_schedule():
    assert sutskever_momentum(1) == 0.5 and sutskever_momentum(249) == 0.5
    assert sutskever_momentum(250) == 0.75 and sutskever_momentum(499) == 0.75
    assert sutskever_momentum(500) == pytest.approx(1 - 1 / 6)
    assert sutskever_momentum(750) == pytest.approx(0.875)
    assert sutskever_momentum(10 ** 6) == 0.99
    assert sutskever_momentum(10 ** 6, mu_max=0.9) == 0.9
    vals = [sutskever_momentum(k) for k in range(1, 3000, 50)]
    assert all(a <= b for a, b in itertools.pairwise(vals))


# ------------------------------------------------------------------------------------- defaults / validation
def test_defaults_are_the_papers():
    net, _X, _y = small_problem()
    opt = KFAC(net, "categorical")
    assert opt.lam == 150.0
    assert opt.gamma == math.sqrt(150.0 + 1e-5)
    assert opt.inverse_kind == "blockdiag" and opt.curvature_estimator == "mc"
    h = opt.hyper.at(opt.k)  # the hyper-parameters as the first step resolves them
    assert [h.T1, h.T2, h.T3] == [5, 20, 20]
    assert h.omega1 == pytest.approx((19 / 20) ** 5, rel=1e-15)
    assert h.omega2 == pytest.approx(math.sqrt(19 / 20) ** 20, rel=1e-15)
    assert h.tau1 == 1 / 8 and h.tau2 == 1 / 4
    assert h.eta == 1e-5 and h.eps_max == 0.95
    assert h.momentum is True and h.rescale is True and h.pi == "trace"
    # ω's follow T's when only T's are given
    h2 = KFAC(net, "categorical", T1=3, T2=10, T3=5).hyper.at(1)
    assert h2.omega1 == pytest.approx(0.95 ** 3) and h2.omega2 == pytest.approx(0.95 ** 5)
    assert KFAC(net, "categorical", lambda_init=3.0, eta=1.0).gamma == 2.0


@pytest.mark.parametrize("kw", [
    {"T2": 30, "T3": 20}, {"T1": 0}, {"T3": 0}, {"tau1": 0.0}, {"tau1": 1.5}, {"tau2": -0.1}, {"tau2": 2},
    {"pi": "x"}, {"pi": 0}, {"pi": True}, {"inverse": "full"}, {"inverse": "diag"}, {"eta": -1.0},
    {"lambda_init": -1.0}, {"curvature_estimator": "empirical"}, {"T1": 2.5}, {"eps_max": 1.5},
])
def test_bad_hyper_parameters_raise(kw):
    net, _X, _y = small_problem()
    with pytest.raises(ValueError):
        KFAC(net, "categorical", **kw)


def test_bad_hyper_parameter_from_a_callable_raises_at_that_step():
    net, X, y = small_problem()
    opt = KFAC(net, "categorical", tau2=lambda k: 0.5 if k < 2 else 0.0)
    opt.step(X, y)
    with pytest.raises(ValueError, match="tau2"):
        opt.step(X, y)


# --------------------------------------------------------------------------------------------- λ inside KFAC
def test_lambda_follows_levenberg_marquardt_every_T1():
    net, X, y = small_problem()
    eta = 1e-5
    opt = KFAC(net, "categorical", lambda_init=1e-3, T1=5, T2=4, T3=2, seed=0)
    w1 = 0.95 ** 5
    lam_prev, seen = 1e-3, set()
    for k, (xb, yb) in enumerate(batches(X, y, 120), start=1):
        h_before = objective(net, xb, yb, eta)
        st = opt.step(xb, yb)
        h_after = objective(net, xb, yb, eta)
        assert st["iteration"] == k
        assert st["objective"] == pytest.approx(h_before, rel=1e-12)
        if k % 5:
            assert math.isnan(st["rho"]) and st["lambda"] == lam_prev
        else:
            rho = (h_after - h_before) / st["M"]
            assert st["rho"] == pytest.approx(rho, rel=1e-8, abs=1e-12)
            if rho > 0.75:
                expected, seen_kind = lam_prev * w1, "down"
            elif rho < 0.25:
                expected, seen_kind = lam_prev / w1, "up"
            else:
                expected, seen_kind = lam_prev, "same"
            assert st["lambda"] == expected
            assert opt.lam == expected
            seen.add(seen_kind)
        lam_prev = st["lambda"]
    assert seen == {"down", "up", "same"}  # all three branches were exercised on this run


# ------------------------------------------------------------------------------------- γ and inverse refresh
def test_gamma_search_every_T2_keeps_the_lowest_M_and_inverse_refresh_schedule():
    net, X, y = small_problem()
    T2, T3 = 4, 2
    opt = KFAC(net, "categorical", "tridiag", lambda_init=1e-3, T2=T2, T3=T3, seed=0)
    w2 = math.sqrt(19 / 20) ** T2
    calls, builds = [], []
    combine, build = opt._combine, opt._build_inverse

    def rec_combine(*a, **kw):
        p = combine(*a, **kw)
        calls.append((p.gamma, p.M))
        return p

    def rec_build(gamma, factors=None, **kw):
        builds.append(gamma)
        return build(gamma, factors, **kw)

    opt._combine, opt._build_inverse = rec_combine, rec_build
    gamma_prev = opt.gamma
    changes = 0
    for k, (xb, yb) in enumerate(batches(X, y, 26), start=1):
        calls.clear()
        builds.clear()
        inv_before = opt.inverse
        st = opt.step(xb, yb)
        refresh = k <= 3 or k % T3 == 0
        assert st["inverse_refreshed"] == refresh
        if k % T2 == 0:
            cands = gamma_candidates(gamma_prev, w2)
            assert [g for g, _ in calls] == cands
            assert builds == cands  # a fresh inverse for each candidate
            best_gamma, best_M = min(calls, key=lambda gm: gm[1])
            assert st["gamma"] == best_gamma and st["M"] == best_M
            assert st["gamma"] in (gamma_prev, gamma_prev * w2, gamma_prev / w2)
            assert opt.inverse.gamma == best_gamma
            changes += st["gamma"] != gamma_prev
        else:
            assert [g for g, _ in calls] == [gamma_prev]
            assert st["gamma"] == gamma_prev
            if refresh:
                assert builds == [gamma_prev] and opt.inverse is not inv_before
            else:
                assert builds == [] and opt.inverse is inv_before
        gamma_prev = st["gamma"]
    assert changes >= 2  # γ actually moved on this run


def test_no_gamma_search_when_adapt_gamma_is_false():
    net, X, y = small_problem()
    opt = KFAC(net, "categorical", T2=2, T3=2, adapt_gamma=False, gamma_init=0.7, seed=0)
    for xb, yb in batches(X, y, 6):
        assert opt.step(xb, yb)["gamma"] == 0.7


def test_factors_are_an_ema_with_the_papers_decay():
    """ε = min(1 − 1/k, 0.95); with exact curvature and τ₁ = 1 each new estimate is the exact one at θ_k."""
    net, X, y = small_problem()
    opt = KFAC(net, "categorical", "blockdiag", curvature_estimator="exact", tau1=1.0, eps_max=0.6, seed=0)
    ref = None
    for k, (xb, yb) in enumerate(batches(X, y, 4), start=1):
        new = K.kronecker_factors(net, xb, "categorical", pairs="diag")  # at θ_k, before the update
        opt.step(xb, yb)
        eps = min(1 - 1 / k, 0.6)
        if ref is None:
            ref = {kl: (new.A[kl].clone(), new.G[kl].clone()) for kl in new.pairs}
        else:
            ref = {kl: (eps * A + (1 - eps) * new.A[kl], eps * G + (1 - eps) * new.G[kl])
                   for kl, (A, G) in ref.items()}
        for kl, (A, G) in ref.items():
            assert torch.allclose(opt.factors.A[kl], A, rtol=1e-12, atol=1e-14)
            assert torch.allclose(opt.factors.G[kl], G, rtol=1e-12, atol=1e-14)
    assert opt.factors.pairs == [(0, 0), (1, 1)]  # block-diagonal needs no cross factors
    opt_t = KFAC(net, "categorical", "tridiag")
    opt_t.step(X, y)
    assert opt_t.factors.pairs == [(0, 0), (0, 1), (1, 1)]


# --------------------------------------------------------------------------------------------- callables
def test_hyper_parameters_as_callables_of_the_step():
    net, X, y = small_problem()
    seen_tau = []
    opt = KFAC(net, "categorical", lambda_init=lambda k: 2.0, eta=lambda k: 0.0 if k == 1 else 0.01,
               rescale=lambda k: k > 2, momentum=lambda k: k % 2 == 0, T1=lambda k: 1,
               tau2=lambda k: 1.0 if k <= 2 else 0.25, omega1=lambda k: 0.5 if k < 4 else 0.8,
               gamma_init=lambda k: 0.3, seed=0)
    subset = opt._subset

    def rec_subset(m, tau):
        seen_tau.append(tau)
        return subset(m, tau)

    opt._subset = rec_subset
    assert opt.lam == 2.0 and opt.gamma == 0.3
    lam_prev, lams = opt.lam, []
    for k, (xb, yb) in enumerate(batches(X, y, 6), start=1):
        seen_tau.clear()
        params = [p.detach().clone() for p in net.parameters()]
        st = opt.step(xb, yb)
        eta = 0.0 if k == 1 else 0.01
        sq = float(sum((p * p).sum() for p in params))
        assert st["objective"] - st["loss"] == pytest.approx(0.5 * eta * sq, rel=1e-12, abs=1e-15)
        if k <= 2:
            assert st["alpha"] == 1.0 and st["mu"] == 0.0  # no re-scaling ⇒ no momentum either
        else:
            assert st["alpha"] != 1.0
            assert (st["mu"] != 0.0) == (k % 2 == 0)
        assert not math.isnan(st["rho"])  # T1 = 1: the λ rule runs every step
        assert seen_tau[-1] == (1.0 if k <= 2 else 0.25)  # S2 drawn with τ₂(k)
        assert seen_tau[0] == 1 / 8  # S1 with the default τ₁
        w1 = 0.5 if k < 4 else 0.8  # ω₁(k)
        assert st["lambda"] == levenberg_marquardt(lam_prev, st["rho"], w1)
        assert st["lambda"] / lam_prev in (pytest.approx(w1), 1.0, pytest.approx(1 / w1))
        lams.append(st["lambda"])
        lam_prev = st["lambda"]
    assert len(set(lams)) > 2  # λ moved, by ω₁(k)
