"""The Fisher (docs/math.md §2): exact, Monte-Carlo, empirical, and the matrix-free products, against the oracle."""

from __future__ import annotations

import oracle as O
import pytest
import torch
from torch import nn

from kfac_lens import (
    cumulant_terms,
    empirical_fisher,
    exact_fisher,
    fisher_gram,
    fisher_vector_product,
    jacobian_products,
    kronecker_factors,
    mc_fisher,
    vec_to_mats,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
problem, N, CASES = O.problem, O.N_CASES, O.NET_CASES


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind,layers", CASES)
def test_exact_fisher_matches_definition(kind, layers, family):
    net, X, _ = problem(kind, family)
    F = exact_fisher(net, X, family, layers=layers)
    Fo = O.exact_fisher(net, X, family, layers)
    assert F.dtype == torch.float64 and F.shape == Fo.shape
    assert O.rel(F, Fo) < TOL  # symmetry and PSD: test_core_silent_errors.py


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind,layers", CASES)
def test_empirical_fisher_matches_label_gradients(kind, layers, family):
    net, X, y = problem(kind, family)
    Fe = empirical_fisher(net, X, y, family, layers=layers)
    assert O.rel(Fe, O.empirical_fisher(net, X, y, family, layers)) < TOL


@pytest.mark.parametrize("family", O.FAMILIES)
def test_exact_fisher_equals_ggn(family):
    """F = Jᵀ H_L J with H_L the Hessian of the loss in z (autograd), whatever the labels."""
    for kind in ("d3", "d4"):
        net, X, y = problem(kind, family)
        assert O.rel(exact_fisher(net, X, family), O.ggn(net, X, y, family)) < TOL


@pytest.mark.parametrize("family", O.FAMILIES)
def test_empirical_fisher_differs_from_exact(family):
    net, X, y = problem("d3", family)
    F = exact_fisher(net, X, family)
    Fe = empirical_fisher(net, X, y, family)
    assert O.rel(Fe, F) > 0.05


def test_exact_fisher_chunked_and_float32_model():
    """Chunking over cases does not change the sum; a float32 model is analysed in float64 on a cast copy."""
    net, X, _ = problem("d4", "categorical", n=11)
    Fo = O.exact_fisher(net, X, "categorical")
    assert O.rel(exact_fisher(net, X, "categorical", chunk_size=3), Fo) < TOL
    net32 = net.float()
    X32 = X.float()
    ref = O.exact_fisher(net32, X32.double(), "categorical")  # the oracle reads the float32 weights exactly
    F = exact_fisher(net32, X32, "categorical")
    assert F.dtype == torch.float64
    assert O.rel(F, ref) < TOL
    assert next(net32.parameters()).dtype == torch.float32  # the user's model is left alone


@pytest.mark.parametrize("family", O.FAMILIES)
def test_mc_fisher_converges_to_exact_and_is_seeded(family):
    net, X, _ = problem("d3", family, n=8)
    F = O.exact_fisher(net, X, family)
    few = mc_fisher(net, X, family, samples=10, seed=0)
    many = mc_fisher(net, X, family, samples=4000, seed=0)
    e_few, e_many = O.rel(few, F), O.rel(many, F)
    assert e_many < 0.05  # about 1/sqrt(samples·N) relative; 0.006–0.018 seen over seeds
    assert e_many < e_few / 4
    assert torch.equal(mc_fisher(net, X, family, samples=10, seed=0), few)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(mc_fisher(net, X, family, samples=10, generator=gen), few)
    assert not torch.equal(mc_fisher(net, X, family, samples=10, seed=1), few)


@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind,layers", [("d3", None), ("d4", None), ("d4", [0, 2])])
def test_fisher_vector_product_and_gram(kind, layers, family):
    net, X, _ = problem(kind, family)
    F = O.exact_fisher(net, X, family, layers)
    P = F.shape[0]
    gen = torch.Generator().manual_seed(7)
    V = torch.randn(P, 3, generator=gen, dtype=torch.float64)

    Fv = fisher_vector_product(net, X, family, V[:, 0], layers=layers)
    assert Fv.shape == (P,)
    assert O.rel(Fv, F @ V[:, 0]) < TOL

    shapes = O.shapes(net, layers)
    mats = vec_to_mats(V[:, 1], shapes)
    out = fisher_vector_product(net, X, family, mats, layers=layers, chunk_size=4)
    assert isinstance(out, list) and [tuple(M.shape) for M in out] == shapes
    assert O.rel(torch.cat([O.vec(M) for M in out]), F @ V[:, 1]) < TOL

    gram = fisher_gram(net, X, family, [V[:, i] for i in range(3)], layers=layers)
    assert O.rel(gram, V.T @ F @ V) < TOL

    z, J = O.jacobians(net, X, layers)
    z_k, Jvs = jacobian_products(net, X, [V[:, 2]], layers=layers)
    assert O.rel(z_k, z) < 1e-14
    assert O.rel(Jvs[0], J @ V[:, 2]) < TOL


def test_exact_fisher_on_device(device):
    net, X, _ = problem("d4", "categorical")
    Fo = O.exact_fisher(net, X, "categorical")
    net_d = net.to(device)
    F = exact_fisher(net_d, X.to(device), "categorical")
    assert F.device.type == device.type
    assert O.rel(F, Fo) < TOL
    v = torch.randn(F.shape[0], dtype=torch.float64, device=device)
    assert O.rel(fisher_vector_product(net_d, X.to(device), "categorical", v), Fo @ v.cpu()) < TOL


@pytest.mark.parametrize("family", O.FAMILIES)
def test_in_place_activation_after_a_linear(family):
    """ReLU(inplace=True) right after a Linear (through an Identity) must not overwrite the recorded s_k."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.ReLU(inplace=True), nn.Linear(5, 3),
                        nn.ReLU(inplace=True), nn.Linear(3, 3)).double()
    plain = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(),
                          nn.Linear(3, 3)).double()
    plain.load_state_dict(net.state_dict())
    X = torch.randn(9, 4, dtype=torch.float64)
    Fo = O.exact_fisher(plain, X, family)
    assert O.rel(exact_fisher(net, X, family), Fo) < TOL
    A, G = O.kronecker_factors(plain, X, family)
    assert O.rel(kronecker_factors(net, X, family).dense(), O.kfac_dense(A, G, [0, 1, 2])) < TOL
    # same seed, same sampled targets; the two nets run different ops (a clone), so compare to rounding
    assert O.rel(mc_fisher(net, X, family, samples=3, seed=0), mc_fisher(plain, X, family, samples=3, seed=0)) < TOL
    if family == "categorical":
        ct = cumulant_terms(net, X, family, 0, 1)
        assert O.rel(ct.kappa4, O.cumulant_terms(plain, X, family, 0, 1)["kappa4"]) < TOL


def test_mc_samples_must_be_a_whole_number():
    net, X, _ = problem("d2", "gaussian", n=4)
    a = mc_fisher(net, X, "gaussian", samples=3.0, seed=2)
    assert torch.equal(a, mc_fisher(net, X, "gaussian", samples=3, seed=2))
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        mc_fisher(net, X, "gaussian", samples=2.5, seed=2)
