"""The K-FAC optimizer on any nn.Module: a CNN (KFC, Grosse & Martens 2016), a skip connection and tied layers.

Two iterations of K-FAC with the exact expectation over y and τ₁ = τ₂ = 1 are recomputed densely from the
oracle's per-case autograd Jacobians (exact F) and its KFAC-expand factors (tests/oracle.py, "any nn.Module"):
Δ = −F̆⁻¹∇h (or F̂⁻¹), the re-scaling of Appendix E.4 and, in the second iteration, the momentum of Appendix F
with the factors' running average (Appendix D). Then K-FAC trains a small CNN on digits, by ``step(x, y)`` and
in the drop-in loop (docs/math.md §1, §3, §7).
"""

from __future__ import annotations

import copy
import math
import time

import oracle as O
import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfac_lens import NetworkView, UnsupportedModelError
from kfac_lens.data import load_digits
from kfac_lens.optim import KFAC

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
TOL = 1e-9


class CNN(nn.Module):
    """Conv2d → ReLU → Conv2d → flatten → Linear."""

    def __init__(self, channels=3, classes=4, size=6):
        super().__init__()
        self.c1 = nn.Conv2d(1, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 3, stride=2, bias=False)
        out = (size - 3) // 2 + 1
        self.fc = nn.Linear(channels * out * out, classes)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


class SkipMLP(nn.Module):
    """A residual connection, layers registered out of their order of use."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 4)
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + torch.sigmoid(self.fc2(h))
        return self.head(h)


class Tied(nn.Module):
    """A wide hidden Linear used twice per case: wide enough that Appendix G's low-rank form would apply."""

    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        return self.out(torch.tanh(self.hidden(h)))


class Tagger(nn.Module):
    """Linear layers on (N, T, D) inputs with an output per position, (N, T, C)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def build(name, n=6, seed=0):
    torch.manual_seed(seed)
    model, shape, names = {"cnn": (CNN, (1, 6, 6), ["c1", "c2", "fc"]),
                           "skip": (SkipMLP, (3,), ["fc1", "fc2", "head"]),
                           "tied": (Tied, (3,), ["inp", "hidden", "out"]),
                           "tagger": (Tagger, (5, 3), ["fc1", "fc2"])}[name]
    model = model().to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *shape, generator=g, dtype=F64)
    y = torch.randint(0, 4, (n, 5) if name == "tagger" else (n,), generator=g)
    return model, X, y, [getattr(model, m) for m in names]


# ----------------------------------------------------------------------------------------- the dense oracle
def case_loss(z, y):
    """The NLL of one case: summed over the positions of a (T, C) output."""
    if z.ndim == 1:
        return O.loss("categorical", z, y)
    return sum(O.loss("categorical", z[t], y[t]) for t in range(z.shape[0]))


def loss_gradient(model, mods, X, y):
    """∇ of the mean NLL with respect to θ (the layers' W = [weight, bias], paper layout), by autograd."""
    th = O.module_theta(mods).requires_grad_(True)
    z = functional_call(model, O.module_params(model, mods, th), (X,))
    h = sum(case_loss(z[n], y[n]) for n in range(X.shape[0])) / X.shape[0]
    (g,) = torch.autograd.grad(h, th)
    return g


def factors(model, mods, X, cross: bool):
    """KFAC-expand factors by definition; with ``cross``, also A[k, l] = E_n[(1/U) Σ_u ā_{k,u} ā_{l,u}ᵀ] and
    G[k, l] = E_n[Σ_u Σ_r g_{k,u} g_{l,u}ᵀ] of layers with the same U uses per case."""
    A, G = O.module_kronecker_factors(model, mods, X, "categorical", "expand")
    if cross:
        per_case = [O.module_uses(model, mods, X[n:n + 1], "categorical")[1] for n in range(X.shape[0])]
        for k in range(len(mods)):
            for l in range(k + 1, len(mods)):
                A[k, l] = sum(sum(torch.outer(a, b) for a, b in zip(u[k][0], u[l][0], strict=True)) / len(u[k][0])
                              for u in per_case) / len(per_case)
                G[k, l] = sum(sum(gk.T @ gl for gk, gl in zip(u[k][1], u[l][1], strict=True))
                              for u in per_case) / len(per_case)
                A[l, k], G[l, k] = A[k, l].T, G[k, l].T
    return A, G


def oracle_iteration(model, mods, X, y, lam, eta, gamma, inverse, previous=None, eps=0.0):
    """θ + δ of one K-FAC iteration from dense matrices; ``previous`` = (A, G, δ₀) of the last iteration."""
    layers = list(range(len(mods)))
    th = O.module_theta(mods)
    A, G = factors(model, mods, X, cross=inverse == "tridiag")
    if previous is not None:
        A = {kl: eps * previous[0][kl] + (1 - eps) * A[kl] for kl in A}
        G = {kl: eps * previous[1][kl] + (1 - eps) * G[kl] for kl in G}
    Ad, Gd, _ = O.damp(A, G, layers, gamma)
    Finv = O.blockdiag_inverse(Ad, Gd, layers) if inverse == "blockdiag" else O.tridiag_inverse(Ad, Gd, layers)
    grad = loss_gradient(model, mods, X, y) + eta * th
    Delta = -Finv @ grad
    F = O.module_exact_fisher(model, mods, X, "categorical")
    c = lam + eta
    if previous is None:
        delta = -(grad @ Delta) / (Delta @ F @ Delta + c * Delta @ Delta) * Delta
    else:
        d0 = previous[2]
        Q = torch.tensor([[Delta @ F @ Delta + c * Delta @ Delta, Delta @ F @ d0 + c * Delta @ d0],
                          [Delta @ F @ d0 + c * Delta @ d0, d0 @ F @ d0 + c * d0 @ d0]], dtype=F64)
        alpha, mu = -torch.linalg.solve(Q, torch.stack([grad @ Delta, grad @ d0]))
        delta = alpha * Delta + mu * d0
    return th + delta, (A, G, delta)


def set_theta(model, mods, th):
    with torch.no_grad():
        for name, p in O.module_params(model, mods, th).items():
            model.get_parameter(name).copy_(p)


@pytest.mark.parametrize("name,inverse", [("cnn", "blockdiag"), ("skip", "blockdiag"), ("skip", "tridiag"),
                                          ("tied", "blockdiag"), ("tagger", "blockdiag"), ("tagger", "tridiag")])
def test_two_iterations_equal_the_dense_recomputation(name, inverse):
    model, X, y, mods = build(name)
    ref = copy.deepcopy(model)
    ref_mods = [getattr(ref, next(n for n, c in model.named_children() if c is m)) for m in mods]
    lam, eta = 0.5, 1e-3
    opt = KFAC(model, "categorical", inverse, example_input=X[:2], curvature_estimator="exact", tau1=1, tau2=1,
               lambda_init=lam, eta=eta)
    assert [L.module for L in opt.view.layers] == mods
    gamma = math.sqrt(lam + eta)
    previous = None
    for k in (1, 2):
        th, previous = oracle_iteration(ref, ref_mods, X, y, lam, eta, gamma, inverse, previous, eps=0.5)
        th0 = O.module_theta(mods)
        st = opt.step(X, y)
        assert st["lambda"] == lam and st["gamma"] == gamma
        assert (st["mu"] == 0.0) if k == 1 else (st["mu"] != 0.0)
        assert O.rel(O.module_theta(mods) - th0, previous[2]) < TOL, k  # the update δ itself
        set_theta(ref, ref_mods, th)


def test_multi_use_layers_skip_the_low_rank_form():
    """The tied hidden layer is wide enough for Appendix G, but its gradient per case has rank 2: the
    update with low_rank=True equals that without."""
    model, X, y, _ = build("tied", n=4)
    twin = copy.deepcopy(model)
    kw = dict(example_input=X[:2], curvature_estimator="exact", tau1=1, tau2=1, lambda_init=0.5)
    a, b = KFAC(model, "categorical", low_rank=True, **kw), KFAC(twin, "categorical", low_rank=False, **kw)
    batch = a._gradient_pass(X, y)[0]
    assert batch.low_rank_pieces(1) is None and batch.low_rank_pieces(0) is not None
    for _ in range(2):
        a.step(X, y)
        b.step(X, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert O.rel(p.detach(), q.detach()) < 1e-12


# ----------------------------------------------------------------------------------------- training on digits
def digits(n=300):
    data = load_digits("train")
    return data.X[:n].reshape(-1, 1, 8, 8), data.y[:n]


def digits_cnn(seed=0):
    torch.manual_seed(seed)
    return CNN(channels=4, classes=10, size=8)


def full_loss(model, X, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


def test_kfac_trains_a_cnn_on_digits():
    X, y = digits()
    model = digits_cnn()
    opt = KFAC(model, "categorical", example_input=X[:2], lambda_init=1.0, seed=0)
    before = full_loss(model, X, y)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(40):
        idx = torch.randperm(X.shape[0], generator=g)[:100]
        opt.step(X[idx], y[idx])
    seconds = time.perf_counter() - t0
    after = full_loss(model, X, y)
    assert after < 0.5 * before, (before, after)
    assert seconds < 30


def test_dropin_loop_trains_the_cnn_and_equals_step_xy():
    X, y = digits(200)
    model = digits_cnn(1)
    ref = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(lambda_init=1.0, seed=2, T1=2, T2=4, T3=2)
    opt = KFAC(model, loss_fn, example_input=X[:2], **kw)
    opt_ref = KFAC(ref, "categorical", example_input=X[:2], **kw)
    before = full_loss(model, X, y)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        idx = torch.randperm(X.shape[0], generator=g)[:64]
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        st = opt.step()
        sr = opt_ref.step(X[idx], y[idx])
        assert (st["lambda"], st["gamma"]) == (sr["lambda"], sr["gamma"])
    for p, q in zip(model.parameters(), ref.parameters()):
        assert O.rel(p.detach(), q.detach()) < 1e-4  # float32: the two gradients are summed in another order
    assert full_loss(model, X, y) < before


def test_a_view_is_accepted_and_a_sequential_with_convolutions_trains():
    X, y = digits(100)
    model = digits_cnn()
    opt = KFAC(NetworkView(model, example_input=X[:2]), "categorical", lambda_init=1.0)
    assert opt.view.is_general
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 10))
    opt2 = KFAC(net, "categorical", lambda_init=1.0)
    before = full_loss(net, X, y)
    for _ in range(5):
        opt.step(X, y)
        opt2.step(X, y)
    assert full_loss(net, X, y) < before


# ----------------------------------------------------------------------------------------- refusals
def test_what_the_optimizer_refuses_is_named():
    model, X, y, _ = build("cnn")
    with pytest.raises(UnsupportedModelError, match=r"CNN.*example_input=X\[:2\]"):
        KFAC(model, "categorical")
    with pytest.raises(ValueError, match=r"inverse='tridiag'.*A\[0, 1\].*'c1' and 'c2'.*36 and 4 uses.*blockdiag"):
        KFAC(model, "categorical", "tridiag", example_input=X[:2])

    tagger, Xt, yt, _ = build("tagger")
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(tagger, loss_fn, example_input=Xt[:2])
    with pytest.raises(ValueError, match=r"y must have shape \(6, 5\)"):
        opt.step(Xt, yt[:, :3])
    loss_fn(tagger(Xt).transpose(1, 2), yt).backward()
    with pytest.raises(ValueError, match=r"shape \(6, 5, 4\), one likelihood term per position.*opt.step\(x, y\)"):
        opt.step()
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4)).to(F64)
    opt = KFAC(net, "categorical", "tridiag")  # read in module order: the uses are found at the first step
    with pytest.raises(ValueError, match=r"A\[0, 1\] of layers '0' and '3'.*16 and 1 uses"):
        opt.step(X, y)


def test_an_iteration_on_the_device_equals_the_cpu(device):
    model, X, y, _ = build("cnn")
    twin = copy.deepcopy(model).to(device)
    kw = dict(curvature_estimator="exact", tau1=1, tau2=1, lambda_init=0.5)
    a = KFAC(model, "categorical", example_input=X[:2], **kw)
    b = KFAC(twin, "categorical", example_input=X[:2].to(device), **kw)
    for _ in range(2):
        sa, sb = a.step(X, y), b.step(X.to(device), y.to(device))
        assert sb["alpha"] == pytest.approx(sa["alpha"], rel=1e-9) and sb["mu"] == pytest.approx(sa["mu"], abs=1e-9)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert O.rel(q.detach().cpu(), p.detach()) < 1e-10


def test_the_first_order_baselines_read_any_module_too():
    from kfac_lens.optim import Adam, SGDNesterov

    X, y = digits(100)
    for make in (lambda m: SGDNesterov(m, "categorical", lr=0.05, example_input=X[:2]),
                 lambda m: Adam(m, "categorical", lr=1e-2, example_input=X[:2])):
        model = digits_cnn()
        opt = make(model)
        before = full_loss(model, X, y)
        for _ in range(20):
            opt.step(X, y)
        assert full_loss(model, X, y) < before
    with pytest.raises(UnsupportedModelError, match="example_input"):
        SGDNesterov(digits_cnn(), "categorical")


# ----------------------------------------------------------------------------------------- data parallel
def cnn_batches(steps=4):
    _, X, y, _ = build("cnn", n=24, seed=5)
    g = torch.Generator().manual_seed(3)
    return [(X[idx], y[idx]) for idx in (torch.randperm(24, generator=g)[:12] for _ in range(steps))]


CNN_KFAC = dict(curvature_estimator="exact", tau1=1.0, tau2=1.0, lambda_init=0.5, T1=2, T2=2, T3=2)


def cnn_kfac_on_rank(rank, world_size, device):
    model, X, _, _ = build("cnn", n=24, seed=5)
    opt = KFAC(model.to(device), "categorical", example_input=X[:2].to(device), distributed=True, **CNN_KFAC)
    for x, y in cnn_batches():
        rows = slice(0, 7) if rank == 0 else slice(7, 12)
        opt.step(x[rows].to(device), y[rows].to(device))
    return torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])


@pytest.mark.timeout(180)
def test_data_parallel_kfac_on_a_cnn_equals_one_process():
    from distributed_ranks import run_ranks

    results = run_ranks(cnn_kfac_on_rank, 2)
    assert all(isinstance(r, torch.Tensor) for r in results), results
    model, X, _, _ = build("cnn", n=24, seed=5)
    opt = KFAC(model, "categorical", example_input=X[:2], **CNN_KFAC)
    for x, y in cnn_batches():
        opt.step(x, y)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for got in results:
        assert O.rel(got, theta) < 1e-10
