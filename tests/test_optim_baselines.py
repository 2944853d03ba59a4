"""First-order baselines (SGD + Nesterov with Sutskever et al.'s μ schedule, Adam) and the train loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kfac_lens.optim import (
    KFAC,
    Adam,
    SGDNesterov,
    evaluate,
    exponential_batch_sizes,
    sutskever_momentum,
    train,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

KFAC_COLUMNS = {"iteration", "loss", "objective", "lambda", "gamma", "alpha", "mu", "rho", "M", "batch_size",
                "inverse_refreshed", "step_time", "time", "eval_loss", "error"}
SGD_COLUMNS = {"iteration", "loss", "batch_size", "step_time", "mu", "lr", "time", "eval_loss", "error"}
ADAM_COLUMNS = {"iteration", "loss", "batch_size", "step_time", "time", "eval_loss", "error"}


def make_problem(n=120, device="cpu", seed=0):
    """A learnable 3-class problem: labels from a fixed random linear map of the inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(device=device, dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 5, generator=g, dtype=F64)
    y = (X @ torch.randn(5, 3, generator=g, dtype=F64)).argmax(1)
    return net, X.to(device), y.to(device)


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac"])
def test_optimizers_reduce_the_loss_through_train(name, device):
    net, X, y = make_problem(device=device)
    opt = {"sgd": lambda: SGDNesterov(net, "categorical", lr=0.2),
           "adam": lambda: Adam(net, "categorical", lr=0.03),
           "kfac": lambda: KFAC(net, "categorical", lambda_init=1.0, seed=0)}[name]()
    iters = 40
    hist = train(net, opt, X, y, iters, batch_size=40, eval_every=10, progress=False)
    cols = {"sgd": SGD_COLUMNS, "adam": ADAM_COLUMNS, "kfac": KFAC_COLUMNS}[name]
    assert set(hist.columns) == cols
    assert list(hist["iteration"]) == list(range(1, iters + 1))
    assert (hist["batch_size"] == 40).all()
    evaluated = hist["eval_loss"].notna()
    assert list(hist["iteration"][evaluated]) == [1, 10, 20, 30, 40]
    first, last = hist["eval_loss"].iloc[0], hist["eval_loss"].iloc[-1]
    assert last < 0.6 * first
    assert hist["error"].iloc[-1] < hist["error"].iloc[0]
    assert (np.diff(hist["time"].to_numpy()) >= 0).all() and (hist["step_time"] > 0).all()
    # eval_loss is the full-data loss after that iteration's step
    ev = evaluate(net, opt.likelihood, X, y)
    assert ev["loss"] == pytest.approx(last, rel=1e-12)
    with torch.no_grad():
        assert ev["loss"] == pytest.approx(float(nn.functional.cross_entropy(net(X), y)), rel=1e-12)
        assert ev["error"] == pytest.approx(float((net(X).argmax(1) != y).double().mean()), rel=1e-12)


def test_sgd_momentum_follows_sutskever_schedule():
    net, X, y = make_problem()
    opt = SGDNesterov(net, "categorical", lr=0.01)
    hist = train(net, opt, X, y, 5, batch_size=20, progress=False)
    assert list(hist["mu"]) == [sutskever_momentum(k) for k in range(1, 6)] == [0.5] * 5
    assert (hist["lr"] == 0.01).all()
    for k, mu in [(250, 0.75), (500, 1 - 1 / 6), (751, 0.875), (10 ** 5, 0.99)]:
        opt.k = k
        st = opt.step(X[:20], y[:20])
        assert st["mu"] == pytest.approx(mu) and opt.opt.param_groups[0]["momentum"] == st["mu"]
    opt2 = SGDNesterov(net, "categorical", lr=0.01, mu_max=0.6)
    opt2.k = 10 ** 4
    assert opt2.step(X[:20], y[:20])["mu"] == 0.6


def test_sgd_nesterov_update_rule():
    """θ ← θ − lr·(g + μ_k b_k), b_k = μ_k b_{k−1} + g, g = ∇(mean NLL) + ηθ; μ_k, lr_k callables of k."""
    net, X, y = make_problem()
    eta = 0.01
    mus, lrs = (lambda k: 0.1 * k), (lambda k: 0.05 / k)
    opt = SGDNesterov(net, "categorical", lr=lrs, momentum=mus, eta=eta)
    theta = [p.detach().clone() for p in net.parameters()]
    buf = None
    ref = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    for k in range(1, 4):
        xb, yb = X[20 * k:20 * k + 20], y[20 * k:20 * k + 20]
        with torch.no_grad():
            for p, t in zip(ref.parameters(), theta):
                p.copy_(t)
        ref.zero_grad()
        nn.functional.cross_entropy(ref(xb), yb).backward()
        g = [p.grad + eta * t for p, t in zip(ref.parameters(), theta)]
        buf = g if buf is None else [mus(k) * b + gi for b, gi in zip(buf, g)]
        theta = [t - lrs(k) * (gi + mus(k) * b) for t, gi, b in zip(theta, g, buf)]
        st = opt.step(xb, yb)
        assert st["mu"] == mus(k) and st["lr"] == lrs(k)
        for p, t in zip(net.parameters(), theta):
            assert torch.allclose(p, t, rtol=1e-13, atol=1e-15)


def test_baselines_reject_bad_learning_rates():
    net, _, _ = make_problem()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            SGDNesterov(net, "categorical", lr=bad)
        with pytest.raises(ValueError):
            Adam(net, "categorical", lr=bad)


def test_batch_size_schedules():
    net, X, y = make_problem(n=1500)
    opt = SGDNesterov(net, "categorical", lr=0.01)
    hist = train(net, opt, X, y, 3, batch_size="exponential", progress=False)
    m = exponential_batch_sizes(1000, 1500)
    assert list(hist["batch_size"]) == [m(1), m(2), m(3)]
    assert hist["batch_size"].iloc[0] == 1000 and 1000 < hist["batch_size"].iloc[2] < 1500

    net, X, y = make_problem(n=60)
    hist = train(net, SGDNesterov(net, "categorical", lr=0.01), X, y, 4, batch_size=lambda k: 7 * k,
                 progress=False)
    assert list(hist["batch_size"]) == [7, 14, 21, 28]
    hist = train(net, SGDNesterov(net, "categorical", lr=0.01), X, y, 2, batch_size=lambda k: 10 ** 6,
                 progress=False)
    assert list(hist["batch_size"]) == [60, 60]  # capped at |S|
    hist = train(net, SGDNesterov(net, "categorical", lr=0.01), X, y, 2, batch_size="exponential",
                 progress=False)
    assert list(hist["batch_size"]) == [60, 60]  # m₁ = min(1000, N)
    for bad in (0, -3, "big", 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            train(net, SGDNesterov(net, "categorical", lr=0.01), X, y, 2, batch_size=bad, progress=False)


def test_train_uses_eval_data_and_time_limit():
    net, X, y = make_problem()
    Xe, ye = X[:30].clone(), y[:30].clone()
    opt = Adam(net, "categorical", lr=0.01)
    hist = train(net, opt, X[30:], y[30:], 6, batch_size=10, eval_X=Xe, eval_y=ye, eval_every=3,
                 progress=False)
    ev = evaluate(net, opt.likelihood, Xe, ye)
    assert hist["eval_loss"].iloc[-1] == pytest.approx(ev["loss"], rel=1e-12)
    hist = train(net, Adam(net, "categorical", lr=0.01), X, y, 1000, batch_size=10, time_limit=0.0,
                 progress=False)
    assert len(hist) == 1  # stops once the optimizer time exceeds the limit
    assert math.isfinite(hist["loss"].iloc[0])
