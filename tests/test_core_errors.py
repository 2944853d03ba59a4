"""Bad input gets a ValueError (a specific subclass where one exists) that names the problem and the way out."""

from __future__ import annotations

import importlib
import time

import oracle as O
import pytest
import torch
from torch import nn

from kfac_lens import (
    DenseTooLargeError,
    NetworkView,
    NonFiniteError,
    SingularFactorError,
    UnsupportedModelError,
    block_diagonal_inverse,
    block_tridiagonal_inverse,
    cumulant_terms,
    empirical_fisher,
    exact_fisher,
    fisher_vector_product,
    get_likelihood,
    kronecker_factors,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# the module (the package re-exports a function of the same name)
fisher_mod = importlib.import_module("kfac_lens.curvature.fisher")


def small():
    net = O.make_net("d3")
    return net, O.make_inputs(net, 6)


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("model,names", [
    (nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 3), nn.Flatten(), nn.Linear(2, 2)),
     ["Conv1d", "nn.Linear"]),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), ["BatchNorm1d", "across cases"]),
    (NotSequential(), ["NotSequential", "nn.Sequential"]),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)), ["Dropout", "p=0"]),
    (nn.Sequential(nn.Tanh()), ["no nn.Linear"]),
])
def test_unsupported_models(model, names):
    for call in (lambda: NetworkView(model),
                 lambda: exact_fisher(model, torch.zeros(2, 3, dtype=torch.float64), "gaussian"),
                 lambda: kronecker_factors(model, torch.zeros(2, 3), "gaussian")):
        with pytest.raises(UnsupportedModelError) as info:
            call()
        assert isinstance(info.value, ValueError)
        for name in names:
            assert name in str(info.value)


def test_unknown_likelihood():
    net, X = small()
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'") as info:
        exact_fisher(net, X, "poisson")
    for choice in ("categorical", "bernoulli", "gaussian"):
        assert choice in str(info.value)
    with pytest.raises(ValueError, match="unknown likelihood"):
        get_likelihood(3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(bad):
    net, X = small()
    X[2, 1] = bad
    for call in (lambda: exact_fisher(net, X, "categorical"),
                 lambda: kronecker_factors(net, X, "categorical"),
                 lambda: fisher_vector_product(net, X, "categorical", torch.zeros(O.theta(net).numel()))):
        with pytest.raises(NonFiniteError, match="NaN or Inf") as info:
            call()
        assert isinstance(info.value, ValueError) and "drop those cases" in str(info.value)
    _, X = small()
    y = torch.zeros(6, 4, dtype=torch.float64)
    y[0, 0] = bad
    with pytest.raises(NonFiniteError, match="y contains NaN or Inf"):
        empirical_fisher(net, X, y, "gaussian")


def test_wrong_number_of_columns():
    net, X = small()
    with pytest.raises(ValueError, match=r"shape \(N, 5\)") as info:
        exact_fisher(net, X[:, :4], "gaussian")
    assert "(6, 4)" in str(info.value)
    with pytest.raises(ValueError, match="Flatten"):
        kronecker_factors(net, X.reshape(6, 5, 1), "gaussian")
    with pytest.raises(ValueError, match="no cases"):
        exact_fisher(net, X[:0], "gaussian")


def test_target_length_mismatch():
    net, X = small()
    with pytest.raises(ValueError, match="X has 6 cases but y has 5; they must match"):
        empirical_fisher(net, X, torch.zeros(5, dtype=torch.long), "categorical")
    with pytest.raises(ValueError, match="X has 6 cases but y has 7"):
        kronecker_factors(net, X, "gaussian", estimator="empirical", y=torch.zeros(7, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pass y="):
        empirical_fisher(net, X, None, "categorical")
    with pytest.raises(ValueError, match="integer class indices"):
        empirical_fisher(net, X, torch.zeros(6, dtype=torch.float64), "categorical")


@pytest.mark.parametrize("how", ["one case", "duplicated inputs"])
@pytest.mark.parametrize("make", [block_diagonal_inverse, block_tridiagonal_inverse])
def test_gamma_zero_with_singular_factor(how, make):
    net, X = small()
    X = X[:1] if how == "one case" else X[:1].repeat(5, 1)
    f = kronecker_factors(net, X, "categorical")
    with pytest.raises(SingularFactorError, match="gamma") as info:
        make(f, 0.0)
    assert isinstance(info.value, ValueError) and "singular" in str(info.value)
    make(f, 0.1)  # the way out works


def test_gamma_zero_is_fine_when_factors_are_regular():
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    X = torch.randn(50, 2, dtype=torch.float64)
    f = kronecker_factors(net, X, "gaussian")
    D = block_diagonal_inverse(f, 0.0).dense()
    assert O.rel(D, torch.linalg.inv(torch.block_diag(*[torch.kron(f.A[k, k], f.G[k, k]) for k in (0, 1)]))) < 1e-10


@pytest.mark.parametrize("gamma", [-1e-3, float("nan"), "big"])
def test_bad_gamma(gamma):
    net, X = small()
    f = kronecker_factors(net, X, "categorical")
    for make in (block_diagonal_inverse, block_tridiagonal_inverse, lambda f, g: f.damped(g)):
        with pytest.raises(ValueError, match="gamma"):
            make(f, gamma)


@pytest.mark.parametrize("pi", ["foo", 0, -1.0, True])
def test_bad_pi(pi):
    net, X = small()
    f = kronecker_factors(net, X, "categorical")
    for make in (block_diagonal_inverse, block_tridiagonal_inverse):
        with pytest.raises(ValueError, match="pi must be 'trace' or a positive number") as info:
            make(f, 0.1, pi=pi)
        assert repr(pi) in str(info.value)


def test_bad_layers_and_estimator():
    net, X = small()
    with pytest.raises(ValueError, match=r"0\.\.2"):
        exact_fisher(net, X, "gaussian", layers=[0, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        kronecker_factors(net, X, "gaussian", layers=[2, 0])
    with pytest.raises(ValueError, match="unknown estimator"):
        kronecker_factors(net, X, "gaussian", estimator="sampled")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        kronecker_factors(net, X, "gaussian", estimator="mc", samples=0)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        cumulant_terms(net, X, "categorical", 0, 5)


def test_dense_too_large_raises_before_any_work(monkeypatch):
    """P ≈ 9M: a dense Fisher needs ~1.9 PB. The error comes before any capture or P×P allocation."""
    net = nn.Sequential(nn.Linear(3000, 3000, dtype=torch.float64))
    X = torch.randn(2, 3000, dtype=torch.float64)

    def no_capture(*a, **k):
        raise AssertionError("captured cases before checking the dense size")

    monkeypatch.setattr(fisher_mod, "iter_captures", no_capture)
    t0 = time.perf_counter()
    with pytest.raises(DenseTooLargeError) as info:
        exact_fisher(net, X, "gaussian")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "P = 9003000" in msg and "layers=" in msg and "matrix-free" in msg
    assert "fisher_vector_product" in msg
    monkeypatch.undo()
    # the way out named in the message works: a matrix-free product
    v = torch.randn(9003000, dtype=torch.float64)
    Fv = fisher_vector_product(net, X, "gaussian", v)
    assert Fv.shape == v.shape and torch.isfinite(Fv).all()


def test_dense_requests_honour_max_bytes():
    net, X = small()
    P = O.theta(net).numel()
    with pytest.raises(DenseTooLargeError, match=f"P = {P}"):
        exact_fisher(net, X, "gaussian", max_bytes=P * P * 8)  # 3 copies needed
    exact_fisher(net, X, "gaussian", max_bytes=3 * P * P * 8)
    f = kronecker_factors(net, X, "gaussian")
    with pytest.raises(DenseTooLargeError, match="layers="):
        f.dense(max_bytes=100)
    for op in (block_diagonal_inverse(f, 0.1), block_tridiagonal_inverse(f, 0.1)):
        with pytest.raises(DenseTooLargeError, match="matrix-free"):
            op.dense(max_bytes=100)
        with pytest.raises(DenseTooLargeError):
            op.dense_approximation(max_bytes=100)


def test_operator_shape_errors():
    net, X = small()
    op = block_tridiagonal_inverse(kronecker_factors(net, X, "gaussian"), 0.1)
    with pytest.raises(ValueError, match="entries"):
        op @ torch.zeros(op.n_params + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="per-layer matrices"):
        op.apply([torch.zeros(7, 6, dtype=torch.float64)])
    with pytest.raises(ValueError, match="expects a matrix of shape"):
        op.apply([torch.zeros(7, 5, dtype=torch.float64), torch.zeros(3, 8), torch.zeros(4, 4)])


# ----------------------------------------------------------------------------- bad input that once got no clear answer
@pytest.mark.parametrize("layers,match", [
    (1, r"layers must be a list.*layers=\[1\]"),
    ([0.6, 1.2], r"0\.6.*integers"),
    ([True, 2], r"True.*integers"),
    ("01", r"layers must be a list"),
    (torch.tensor(1), r"layers must be a list"),
])
def test_layers_of_the_wrong_type(layers, match):
    """A bare int, floats (once silently truncated to [0, 1]), bools and strings are refused by name."""
    net, X = small()
    for call in (lambda: exact_fisher(net, X, "gaussian", layers=layers),
                 lambda: kronecker_factors(net, X, "gaussian", layers=layers),
                 lambda: fisher_vector_product(net, X, "gaussian", torch.zeros(3), layers=layers)):
        with pytest.raises(TypeError, match=match):
            call()


def test_integer_like_layers_are_accepted():
    import numpy as np
    net, X = small()
    F = exact_fisher(net, X, "gaussian", layers=[1, 2])
    for same in ((1, 2), np.array([1, 2]), torch.tensor([1, 2]), range(1, 3)):
        assert torch.equal(exact_fisher(net, X, "gaussian", layers=same), F)  # the same code path


@pytest.mark.parametrize("k", [1.9, "1"])
def test_cumulant_block_index_of_the_wrong_type(k):
    net, X = small()
    with pytest.raises(TypeError, match="integers|integer"):
        cumulant_terms(net, X, "categorical", k, 2)


def test_model_on_the_meta_device():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"'meta' device.*to_empty"):
        exact_fisher(net, torch.zeros(2, 3), "gaussian")


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, "8", True])
def test_bad_chunk_size(chunk_size):
    net, X = small()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        fisher_vector_product(net, X, "gaussian", torch.zeros(31, dtype=torch.float64), chunk_size=chunk_size)
    if chunk_size is not True:
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            exact_fisher(net, X, "gaussian", chunk_size=chunk_size)


@pytest.mark.parametrize("samples", [0, 2.5, "3"])
def test_bad_samples(samples):
    net, X = small()
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        kronecker_factors(net, X, "gaussian", estimator="mc", samples=samples)


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
def test_integer_targets_for_a_per_output_likelihood_name_the_dtype(family):
    net, X = small()
    y = torch.ones(X.shape[0], 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"floating point, got dtype torch\.int64.*y\.float\(\)"):
        empirical_fisher(net, X, y, family)


def test_one_hot_categorical_targets_name_the_fix():
    net, X = small()
    y = torch.nn.functional.one_hot(torch.zeros(X.shape[0], dtype=torch.long), 4).double()
    with pytest.raises(ValueError, match=r"dtype torch\.float64.*class indices"):
        empirical_fisher(net, X, y, "categorical")
