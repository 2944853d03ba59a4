"""Ordinary networks and inputs that once gave a silent wrong answer: now right, or refused by name.

Each test here failed on the code before it was written: reused modules, in-place activations on the
J-product path, BLAS-rounding asymmetry, mixed dtypes, huge finite inputs, a doubled output link.
"""

from __future__ import annotations

import warnings

import oracle as O
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from kfac_lens import (
    NetworkView,
    NonFiniteError,
    UnsupportedModelError,
    exact_fisher,
    fisher_gram,
    fisher_vector_product,
    jacobian_products,
    kronecker_factors,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10


def autograd_fisher(model, X, family):
    """F = (1/N) Σ_n J_nᵀ F_R J_n from autograd Jacobians of the model itself, all parameters in the order
    (weight, bias) per Linear in paper layout — independent of both the package and the oracle's walk."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    rows = []
    for x in X:
        J = jacrev(f)(params, x)  # name -> (C, *param.shape)
        blocks = []
        for lin in lins:
            w = J[names[id(lin.weight)]]                      # (C, d_out, d_in)
            parts = [w]
            if lin.bias is not None:
                parts.append(J[names[id(lin.bias)]][:, :, None])
            W = torch.cat(parts, dim=2)                         # (C, d_out, a_dim)
            blocks.append(W.transpose(1, 2).reshape(W.shape[0], -1))  # column-major vec
        rows.append(torch.cat(blocks, dim=1))
    z = model(X).detach()
    return sum(Jn.T @ O.output_fisher(family, z[n]) @ Jn for n, Jn in enumerate(rows)) / X.shape[0]


# ----------------------------------------------------------------------------- symmetry by construction
@pytest.mark.parametrize("family", O.FAMILIES)
@pytest.mark.parametrize("kind,layers", O.NET_CASES)
def test_exact_fisher_is_symmetric_and_positive_semidefinite(kind, layers, family):
    """Exact symmetry is guaranteed by construction (diagonal blocks are symmetrised, the lower blocks are
    transposes), so it holds whatever the GEMM's rounding; PSD is a property of the Fisher itself."""
    net, X, _ = O.problem(kind, family)
    F = exact_fisher(net, X, family, layers=layers)
    assert torch.equal(F, F.T)
    ev = torch.linalg.eigvalsh(F)
    assert float(ev.min()) >= -1e-12 * float(ev.max())


# ----------------------------------------------------------------------------- reused modules
def test_a_linear_used_twice_is_refused_by_name():
    lin = nn.Linear(4, 4).double()
    net = nn.Sequential(lin, nn.Tanh(), lin)
    X = torch.randn(5, 4, dtype=torch.float64)
    for call in (lambda: NetworkView(net), lambda: exact_fisher(net, X, "gaussian"),
                 lambda: kronecker_factors(net, X, "gaussian")):
        with pytest.raises(UnsupportedModelError, match=r"'2'.*same module as '0'.*deepcopy"):
            call()


def test_a_parameter_free_module_used_twice_is_fine():
    """One Tanh instance at two places is not shared *weights*: the Fisher is still exact."""
    torch.manual_seed(3)
    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 2)).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    assert len(NetworkView(net)) == 3
    assert O.rel(exact_fisher(net, X, "categorical"), autograd_fisher(net, X, "categorical")) < TOL


# ----------------------------------------------------------------------------- in-place modules
INPLACE = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5, inplace=True),
}


def inplace_net(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), INPLACE[act](), nn.Linear(6, 5), INPLACE[act](), nn.Linear(5, 3)).double()
    X = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, X


@pytest.mark.parametrize("act", sorted(INPLACE))
def test_inplace_activations_on_every_path(act):
    """Dense Fisher, factors, J-products, the Gram of the optimizer's α/μ and F v all match the oracle
    (which hands every module a copy of its input)."""
    net, X = inplace_net(act)
    X_before = X.clone()
    F = O.exact_fisher(net, X, "categorical")
    assert O.rel(exact_fisher(net, X, "categorical"), F) < TOL
    A, G = O.kronecker_factors(net, X, "categorical", [0, 1, 2])
    f = kronecker_factors(net, X, "categorical")
    assert O.rel(f.dense(), O.kfac_dense(A, G, [0, 1, 2])) < TOL
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(3, F.shape[0], dtype=torch.float64, generator=gen)
    assert O.rel(fisher_gram(net, X, "categorical", list(V)), V @ F @ V.T) < TOL
    assert O.rel(fisher_vector_product(net, X, "categorical", V[0]), F @ V[0]) < TOL
    z, Jv = jacobian_products(net, X, [V[1]])
    z_o, J = O.jacobians(net, X)
    assert O.rel(Jv[0], torch.einsum("ncp,p->nc", J, V[1])) < TOL
    assert O.rel(z, z_o) < TOL
    assert torch.equal(X, X_before)  # the caller's inputs are never written to


def test_inplace_first_module_leaves_inputs_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    X_before = X.clone()
    F = exact_fisher(net, X, "gaussian")
    v = torch.randn(F.shape[0], dtype=torch.float64)
    Fv = fisher_vector_product(net, X, "gaussian", v)
    assert torch.equal(X, X_before)
    assert O.rel(F, O.exact_fisher(net, X, "gaussian")) < TOL
    assert O.rel(Fv, F @ v) < TOL


# ----------------------------------------------------------------------------- one dtype policy
def test_every_curvature_function_computes_in_float64_by_default():
    """A float32 model with a float64 vector: the answer is float64 and exact for the float32 weights."""
    net, X, _ = O.problem("d3", "bernoulli")
    net32 = net.float()
    F = O.exact_fisher(net32, X.float().double(), "bernoulli")
    v64 = torch.randn(F.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v32 = v64.float()
    for v in (v64, v32):
        Fv = fisher_vector_product(net32, X.float(), "bernoulli", v)
        assert Fv.dtype == torch.float64
        assert O.rel(Fv, F @ v.double()) < TOL
        gram = fisher_gram(net32, X.float(), "bernoulli", [v])
        assert gram.dtype == torch.float64
        assert O.rel(gram, v.double()[None] @ F @ v.double()[:, None]) < TOL
        z, Jv = jacobian_products(net32, X.float(), [v])
        assert z.dtype == Jv[0].dtype == torch.float64
    assert exact_fisher(net32, X.float(), "bernoulli").dtype == torch.float64
    assert kronecker_factors(net32, X.float(), "bernoulli").dtype == torch.float64
    assert next(net32.parameters()).dtype == torch.float32  # the user's model is left alone


def test_dtype_none_computes_in_the_models_dtype():
    net, X, _ = O.problem("d3", "gaussian")
    net32 = net.float()
    F = O.exact_fisher(net32, X.float().double(), "gaussian")
    v = torch.randn(F.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Fv = fisher_vector_product(net32, X, "gaussian", v, dtype=None)
    assert Fv.dtype == torch.float32
    assert O.rel(Fv.double(), F @ v) < 1e-5  # float32 rounding, not float64
    gram = fisher_gram(net32, X, "gaussian", [v], dtype=None)
    assert gram.dtype == torch.float32
    assert exact_fisher(net32, X, "gaussian", dtype=None).dtype == torch.float32


# ----------------------------------------------------------------------------- inputs at the edge
def test_huge_finite_inputs_are_not_called_non_finite():
    """1.7e308 is finite: the input check must not overflow a float64 sum and blame the inputs."""
    net, X, _ = O.problem("d2", "gaussian", n=3)
    X = X.clone()
    X[0, :2] = 1.7e308
    try:
        F = exact_fisher(net, X, "gaussian")
    except NonFiniteError as err:  # the network itself overflows on such inputs: that is what must be said
        assert "X contains" not in str(err)
        assert "overflow" in str(err)
    else:
        assert torch.isfinite(F).all()


# ----------------------------------------------------------------------------- a link applied twice
@pytest.mark.parametrize("last,family", [(nn.Softmax(dim=1), "categorical"), (nn.LogSoftmax(dim=1), "categorical"),
                                         (nn.Sigmoid(), "bernoulli")])
def test_output_link_applied_twice_warns(last, family):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), last).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=f"ends in {type(last).__name__}.*applied twice"):
        exact_fisher(net, X, family)
    with pytest.warns(UserWarning, match="applied twice"):
        fisher_vector_product(net, X, family, torch.zeros(31, dtype=torch.float64))


def test_a_final_sigmoid_with_a_gaussian_likelihood_is_not_a_doubled_link():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact_fisher(net, torch.randn(4, 3, dtype=torch.float64), "gaussian")
