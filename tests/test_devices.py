"""Every public curvature object and the optimizer on each device (the CPU, and CUDA when torch sees one).

The device follows the model: results live on the model's device. Each object is checked against the
independent float64 oracle (tests/oracle.py), evaluated on the CPU, so a CUDA run checks the CUDA numerics
against definitions, not against the package's CPU path. ``kfac-lens gpu-check`` runs these with
``-k cuda`` on a GPU machine.
"""

from __future__ import annotations

import copy

import oracle as O
import pytest
import torch
from torch import nn

import kfac_lens as K

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
TOL = 1e-10


def problem(family: str, device: torch.device, n: int = 40):
    net = O.make_net("d4", seed=3)
    X = O.make_inputs(net, n, seed=4)
    y = O.random_targets(family, n, O.n_outputs(net), torch.Generator().manual_seed(5))
    return net, X, y, copy.deepcopy(net).to(device), X.to(device), y.to(device)


@pytest.mark.parametrize("family", ["categorical", "bernoulli", "gaussian"])
def test_fisher_estimators_on_device(device, family):
    net, X, y, net_d, X_d, y_d = problem(family, device)
    F = K.exact_fisher(net_d, X_d, family)
    assert F.device.type == device.type and F.dtype == F64
    assert O.rel(F.cpu(), O.exact_fisher(net, X, family)) < TOL
    Fe = K.empirical_fisher(net_d, X_d, y_d, family)
    assert O.rel(Fe.cpu(), O.empirical_fisher(net, X, y, family)) < TOL
    # Monte-Carlo: unbiased, so with many samples it approaches the exact Fisher (a loose, honest bound).
    Fm = K.mc_fisher(net_d, X_d, family, samples=400, seed=0)
    assert Fm.device.type == device.type
    assert O.rel(Fm.cpu(), F.cpu()) < 0.15


def test_factors_inverses_and_products_on_device(device):
    family, gamma = "categorical", 0.05
    net, X, _, net_d, X_d, _ = problem(family, device)
    f = K.kronecker_factors(net_d, X_d, family)
    A, G = O.kronecker_factors(net, X, family)
    layers = O.all_layers(net)
    assert O.rel(f.dense().cpu(), O.kfac_dense(A, G, layers)) < TOL
    Ad, Gd, _ = O.damp(A, G, layers, gamma)
    for op, ref in ((K.block_diagonal_inverse(f, gamma), O.blockdiag_inverse(Ad, Gd, layers)),
                    (K.block_tridiagonal_inverse(f, gamma), O.tridiag_inverse(Ad, Gd, layers))):
        D = op.dense()
        assert D.device.type == device.type
        assert O.rel(D.cpu(), ref) < TOL
    v = torch.randn(sum(O.sizes(net)), dtype=F64, generator=torch.Generator().manual_seed(6))
    Fo = O.exact_fisher(net, X, family)
    assert O.rel(K.fisher_vector_product(net_d, X_d, family, v.to(device)).cpu(), Fo @ v) < TOL
    g = K.fisher_gram(net_d, X_d, family, [v.to(device), (2 * v).to(device)])
    assert O.rel(g.cpu(), torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64) * (v @ Fo @ v)) < TOL


def test_cumulants_on_device(device):
    family = "categorical"
    net, X, _, net_d, X_d, _ = problem(family, device, n=25)
    terms = K.cumulant_terms(net_d, X_d, family, 1, 2, estimator="exact")
    ref = O.cumulant_terms(net, X, family, 1, 2)
    for name in ("difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3"):
        assert getattr(terms, name).device.type == device.type
        assert O.rel(getattr(terms, name).cpu(), ref[name]) < 1e-9


def test_compare_approximations_on_device(device):
    family = "bernoulli"
    net, X, y, net_d, X_d, y_d = problem(family, device)
    kinds = ("kfac", "kfac-tridiag", "diagonal")
    cpu = K.compare_approximations(net, X, family, approximations=kinds, y=y, gamma=0.1)
    dev = K.compare_approximations(net_d, X_d, family, approximations=kinds, y=y_d, gamma=0.1)
    assert cpu["ng_cosine"].notna().all()
    for column in ("rel_frobenius", "ng_cosine"):
        assert torch.allclose(torch.tensor(dev[column].to_numpy()), torch.tensor(cpu[column].to_numpy()),
                              rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_kfac_iterates_on_device_equal_the_cpu_ones(device, inverse):
    """With the exact curvature estimator and τ₁ = τ₂ = 1 nothing is random, so the device run must follow
    the CPU run to rounding (float64)."""
    family = "categorical"
    net, X, y, _, _, _ = problem(family, torch.device("cpu"), n=48)
    runs = {}
    for where in ("cpu", device.type):
        model = O.make_net("d4", seed=3).to(where)
        opt = K.KFAC(model, family, inverse, curvature_estimator="exact", tau1=1.0, tau2=1.0, seed=0)
        for step in range(6):
            rows = slice(8 * (step % 3), 8 * (step % 3) + 24)
            opt.step(X[rows].to(where), y[rows].to(where))
        runs[where] = O.theta(model).cpu()
        assert next(model.parameters()).device.type == where
    assert O.rel(runs[device.type], runs["cpu"]) < 1e-9
    assert O.rel(runs["cpu"], O.theta(net)) > 1e-3  # it moved


def test_dropin_loop_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(F64).to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 6, dtype=F64, generator=g)
    y = (X[:, :4].argmax(1)).to(device)
    X = X.to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = K.KFAC(model, loss_fn, lambda_init=1.0, seed=0)
    first = None
    for step in range(15):
        rows = slice(32 * (step % 8), 32 * (step % 8) + 32)
        opt.zero_grad()
        loss = loss_fn(model(X[rows]), y[rows])
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    final = loss_fn(model(X), y).item()
    assert final < 0.7 * first
    state = opt.state_dict()
    kept = list(tensors_in(state["factors"])) + list(tensors_in(state["delta0"]))
    assert kept and all(t.device.type == device.type for t in kept)


def tensors_in(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def test_cpu_checkpoint_resumes_on_device(device):
    """A state saved by a CPU run loads into an optimizer on ``device``: factors and δ₀ move there; the random
    stream continues when the device kind is the same and is re-seeded, with a warning, when it is not."""
    import warnings

    family = "categorical"
    _, X, y, _, _, _ = problem(family, torch.device("cpu"), n=48)
    model = O.make_net("d4", seed=3)
    opt = K.KFAC(model, family, lambda_init=1.0, seed=0)
    for step in range(3):
        opt.step(X[16 * step:16 * step + 16], y[16 * step:16 * step + 16])
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": opt.state_dict()}
    moved = O.make_net("d4", seed=3).to(device)
    moved.load_state_dict(saved["model"])
    resumed = K.KFAC(moved, family, lambda_init=1.0, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(saved["opt"])
    reseeded = [w for w in caught if "not bit-identical" in str(w.message)]
    assert len(reseeded) == (device.type != "cpu")
    assert all(t.device.type == device.type for t in tensors_in(resumed.state_dict()["factors"]))
    resumed.step(X[:16].to(device), y[:16].to(device))
    assert all(torch.isfinite(p).all() for p in moved.parameters())
