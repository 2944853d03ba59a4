"""Theorem 1 (Appendix K): undamped K-FAC is invariant to the affine re-parameterisation of every layer.

The transformed network computes ``s†_i = W†_i ā†_{i−1}``, then ``s_i = Φ_i s†_i``, ``a_i = φ(s_i)`` and
``ā†_i = Ω_i ā_i`` (Ω_i's last row is [0 … 0 1], so the homogeneous 1 survives; Ω_ℓ = I). With
``W_i = Φ_i W†_i Ω_{i−1}`` both networks compute the same function, and K-FAC's update on the transformed
network maps back: ``ΔW_i = Φ_i ΔW†_i Ω_{i−1}`` — for F̆ and F̂, with re-scaling by α and with momentum.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.optim import KFAC

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SIZES = [4, 5, 5, 3]


class FixedAffine(nn.Module):
    """A parameter-free map ``a ↦ M a`` or, with ``homogeneous``, ``a ↦ (M [a; 1])[:-1]``. M is a buffer."""

    def __init__(self, M: torch.Tensor, homogeneous: bool):
        super().__init__()
        self.register_buffer("M", M.clone())
        self.homogeneous = homogeneous

    def forward(self, a):
        if self.homogeneous:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            return (a @ self.M.T)[:, :-1]
        return a @ self.M.T


def well_conditioned(n, g, scale=0.3):
    return torch.eye(n, dtype=F64) + scale * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)


def omega(n, g):
    O = well_conditioned(n + 1, g)
    O[-1] = 0.0
    O[-1, -1] = 1.0
    return O


def build_pair(seed=0):
    """The original net, the transformed net (same function) and the transforms Ω_0..Ω_{ℓ−1}, Φ_1..Φ_ℓ."""
    torch.manual_seed(seed)
    L = len(SIZES) - 1
    lins = [nn.Linear(SIZES[i], SIZES[i + 1]).to(F64) for i in range(L)]
    with torch.no_grad():
        for lin in lins:  # leave tanh's linear regime so the factors are well conditioned
            lin.weight.mul_(3.0)
            lin.bias.normal_()
    mods = []
    for i, lin in enumerate(lins):
        mods += [lin] + ([nn.Tanh()] if i < L - 1 else [])
    net = nn.Sequential(*mods)

    g = torch.Generator().manual_seed(seed + 3)
    Om = [omega(SIZES[i], g) for i in range(L)]
    Ph = [well_conditioned(SIZES[i + 1], g) for i in range(L)]
    W = K.NetworkView(net).weight_matrices()
    W_dag = [torch.linalg.solve(Ph[i], W[i]) @ torch.linalg.inv(Om[i]) for i in range(L)]
    mods2 = [FixedAffine(Om[0], True)]
    for i in range(L):
        mods2 += [nn.Linear(SIZES[i], SIZES[i + 1]).to(F64), FixedAffine(Ph[i], False)]
        if i < L - 1:
            mods2 += [nn.Tanh(), FixedAffine(Om[i + 1], True)]
    net2 = nn.Sequential(*mods2)
    K.NetworkView(net2).set_weight_matrices(W_dag)
    return net, net2, Om, Ph


def data(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, SIZES[0], generator=g, dtype=F64), torch.randn(n, SIZES[-1], generator=g, dtype=F64)


def test_transformed_network_is_a_reparameterisation():
    net, net2, Om, Ph = build_pair()
    X, _ = data()
    assert not list(net2[0].parameters()) and "M" in dict(net2[0].named_buffers())
    assert len(K.NetworkView(net2)) == len(K.NetworkView(net))
    assert torch.allclose(net(X), net2(X), rtol=0, atol=1e-12)
    # W_i = Φ_i W†_i Ω_{i−1} holds, and the transform is far from the identity (a meaningful test).
    W, Wd = K.NetworkView(net).weight_matrices(), K.NetworkView(net2).weight_matrices()
    for i in range(len(W)):
        assert torch.allclose(Ph[i] @ Wd[i] @ Om[i], W[i], atol=1e-12)
        assert (Wd[i] - W[i]).abs().max() > 0.1
    # the factors are full rank (Theorem 1 needs undamped, invertible factors)
    f = K.kronecker_factors(net, X[:100], "gaussian", pairs="diag")
    for k in range(len(W)):
        assert torch.linalg.matrix_rank(f.A[k, k]) == f.A[k, k].shape[0]
        assert torch.linalg.matrix_rank(f.G[k, k]) == f.G[k, k].shape[0]


@pytest.mark.parametrize("estimator", ["exact", "mc"])
@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_undamped_kfac_update_is_invariant(inverse, estimator):
    net, net2, Om, Ph = build_pair()
    X, Y = data()
    kw = {"lambda_init": 0, "eta": 0, "gamma_init": 0, "adapt_gamma": False, "adapt_lambda": False,
          "tau1": 0.5, "curvature_estimator": estimator, "seed": 7}
    o1, o2 = KFAC(net, "gaussian", inverse, **kw), KFAC(net2, "gaussian", inverse, **kw)
    v1, v2 = K.NetworkView(net), K.NetworkView(net2)
    for k in range(3):  # k = 1: α only; k = 2, 3: α and μ (momentum)
        xb, yb = X[40 * k:40 * k + 120], Y[40 * k:40 * k + 120]
        W1, W2 = v1.weight_matrices(), v2.weight_matrices()
        s1, s2 = o1.step(xb, yb), o2.step(xb, yb)
        assert s1["gamma"] == s2["gamma"] == 0.0
        d1 = [a - b for a, b in zip(v1.weight_matrices(), W1)]
        d2 = [a - b for a, b in zip(v2.weight_matrices(), W2)]
        mapped = [Ph[i] @ d2[i] @ Om[i] for i in range(len(d1))]
        for a, b in zip(d1, mapped):
            assert float((a - b).norm() / a.norm()) < 1e-8
        # the raw transformed update differs from the original one: invariance is not trivial
        assert max(float((a - b).norm() / a.norm()) for a, b in zip(d1, d2)) > 1e-2
        assert s1["alpha"] == pytest.approx(s2["alpha"], rel=1e-8)
        assert s1["mu"] == pytest.approx(s2["mu"], rel=1e-8, abs=1e-12)
        assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-10)
        if k:
            assert s1["mu"] != 0.0
    assert torch.allclose(net(X), net2(X), rtol=0, atol=1e-8)


def test_damping_breaks_the_invariance():
    """Control: with factored Tikhonov damping γ > 0 the same comparison fails (so the check has teeth)."""
    net, net2, Om, Ph = build_pair()
    X, Y = data()
    kw = {"lambda_init": 0, "eta": 0, "gamma_init": 0.3, "adapt_gamma": False, "adapt_lambda": False,
          "tau1": 0.5, "curvature_estimator": "exact", "seed": 7}
    o1 = KFAC(copy.deepcopy(net), "gaussian", "blockdiag", **kw)
    o2 = KFAC(net2, "gaussian", "blockdiag", **kw)
    W1, W2 = o1.view.weight_matrices(), o2.view.weight_matrices()
    o1.step(X, Y)
    o2.step(X, Y)
    d1 = [a - b for a, b in zip(o1.view.weight_matrices(), W1)]
    d2 = [a - b for a, b in zip(o2.view.weight_matrices(), W2)]
    err = max(float((d1[i] - Ph[i] @ d2[i] @ Om[i]).norm() / d1[i].norm()) for i in range(len(d1)))
    assert err > 1e-4
