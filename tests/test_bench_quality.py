"""``kfac-lens bench quality`` in its quick mode, and the batched exact-F product it rests on.

Timings are printed, never asserted."""

from __future__ import annotations

import math

import oracle as O
import pytest
import torch
from torch import nn

from kfac_lens import bench
from kfac_lens.curvature.fisher import fisher_matrix_product, fisher_vector_product


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_fisher_matrix_product_matches_columns(likelihood):
    net = _net()
    X = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    P = sum(p.numel() for p in net.parameters())
    V = torch.randn(P, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    FV = fisher_matrix_product(net, X, likelihood, V, chunk_size=13)
    ref = O.exact_fisher(net, X, likelihood) @ V  # the independent dense oracle
    torch.testing.assert_close(FV, ref, rtol=1e-10, atol=1e-13)
    columns = torch.stack([fisher_vector_product(net, X, likelihood, V[:, i]) for i in range(5)], dim=1)
    torch.testing.assert_close(FV, columns, rtol=1e-12, atol=1e-14)
    sub = torch.randn(7 * 6 + 3 * 5, 2, dtype=torch.float64)
    FS = fisher_matrix_product(net, X, likelihood, sub, layers=[0, 2])
    ref = O.exact_fisher(net, X, likelihood, layers=[0, 2]) @ sub
    torch.testing.assert_close(FS, ref, rtol=1e-10, atol=1e-13)
    f32 = fisher_matrix_product(net, X, likelihood, V, dtype=torch.float32)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), FV, rtol=1e-4, atol=1e-6)


class _Residual(nn.Module):
    """A convolution and a skip connection: the functional (non-chain) path of the products."""

    def __init__(self):
        super().__init__()
        self.c, self.l1, self.l2, self.out = nn.Conv2d(1, 3, 3), nn.Linear(48, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.l1(torch.relu(self.c(x)).flatten(1)))
        return self.out(h + torch.tanh(self.l2(h)))


def test_fisher_matrix_product_general_network():
    from kfac_lens.nets import NetworkView

    torch.manual_seed(0)
    model = _Residual().double()
    X = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    net = NetworkView(model, example_input=X[:2])
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    FV = fisher_matrix_product(net, X, "categorical", V, chunk_size=7)
    ref = torch.stack([fisher_vector_product(net, X, "categorical", V[:, i]) for i in range(3)], dim=1)
    torch.testing.assert_close(FV, ref, rtol=1e-12, atol=1e-14)


def test_fisher_matrix_product_names_bad_V():
    net = _net()
    X = torch.randn(10, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="V must be a"):
        fisher_matrix_product(net, X, "categorical", torch.zeros(3))
    with pytest.raises(ValueError, match="rows"):
        fisher_matrix_product(net, X, "categorical", torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.timeout(60)
def test_quality_quick_table(capsys):
    df = bench.run(["quality", "--quick", "--cases", "300", "--probes", "8", "--threads", "1"])
    out = capsys.readouterr().out
    assert "quality: matrix-free errors" in out and "targets 120 s" in out
    assert list(df.columns) == ["quantity", "value", "ci_low", "ci_high", "ratio_to_target"]
    assert df["quantity"].iloc[0] == "wall clock (s)"
    assert math.isclose(df["ratio_to_target"].iloc[0], df["value"].iloc[0] / 120.0)
    errors = df[df["quantity"].str.startswith("rel_frobenius")]
    assert sorted(errors["quantity"]) == sorted(f"rel_frobenius {a}" for a in bench.quality.APPROXIMATIONS)
    assert ((errors["ci_low"] <= errors["value"]) & (errors["value"] <= errors["ci_high"])).all()
    top = df[df["quantity"].str.startswith("F̂⁻¹F")]["value"]
    assert len(top) == 2 and top.iloc[0] >= top.iloc[1] > 0
    assert df.attrs["comparison"].attrs["fisher_products"] > 0


def test_quality_paper_preset_table(capsys):
    """--preset paper: K-FAC's first γ = √(λ₀ + η) of the paper and the 15-minute target (here on digits, as a
    smoke test: --quick)."""
    df = bench.run(["quality", "--preset", "paper", "--quick", "--probes", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "paper autoencoder (digits" in out and "targets 900 s" in out
    assert math.isclose(df["ratio_to_target"].iloc[0], df["value"].iloc[0] / 900.0)
    assert f"γ = {(150 + 1e-5) ** 0.5:.3g}" in out


def test_quality_refuses_cuda():
    with pytest.raises(SystemExit, match="drop --device"):
        bench.run(["quality", "--quick", "--device", "cuda", "--no-print"])


@pytest.mark.parametrize("likelihood,outputs", [("categorical", None), ("bernoulli", 16)])
def test_compare_approximations_float32_products(likelihood, outputs):
    """fisher_dtype=float32 runs the set-up's passes (factors, diag(F), EK-FAC scalings) and the F-products in
    float32: every matrix-free column stays within float32 rounding of the float64 run's, whether the set-up
    takes the captures (3 outputs) or the output-Fisher passes (16 outputs)."""
    from kfac_lens.capture import as_view
    from kfac_lens.curvature.output_fisher import output_fisher_is_cheaper
    from kfac_lens.curvature.quality import compare_approximations

    net = _net()
    if outputs is not None:
        torch.manual_seed(1)
        net[4] = nn.Linear(4, outputs).double()
    assert output_fisher_is_cheaper(as_view(net), [0, 1, 2], ekfac=True) == (outputs is not None)
    X = torch.randn(60, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = (X[:, :1] > 0).double().expand(60, 16) if likelihood == "bernoulli" else torch.arange(60) % 3
    kw = dict(approximations=["kfac", "kfac-blockdiag", "kfac-tridiag", "ekfac", "diagonal"], gamma=0.1,
              method="matrix-free", probes=6, top_k=3, spectra=["kfac-blockdiag", "kfac-tridiag"], y=y)
    f64 = compare_approximations(net, X, likelihood, **kw)
    f32 = compare_approximations(net, X, likelihood, fisher_dtype=torch.float32, **kw)
    for col in ("rel_frobenius", "ci_low", "ci_high", "ng_cosine"):
        torch.testing.assert_close(torch.tensor(f32[col].values), torch.tensor(f64[col].values), rtol=1e-4, atol=0)
    for a, b in zip(f32["top_eigs_precond"], f64["top_eigs_precond"]):
        if b is not None:
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="fisher_dtype"):
        compare_approximations(net, X, "categorical", fisher_dtype=torch.float16, **kw)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_chain_fisher_product_matches_oracle(likelihood):
    """The cached-primal F V of a Linear chain (curvature/chain_products.py) equals the dense oracle's and
    fisher_matrix_product's, on layer subsets, with an in-place ReLU, a bias-free layer and a trailing activation."""
    from kfac_lens.capture import analysis_view
    from kfac_lens.curvature.chain_products import ChainFisherProduct
    from kfac_lens.likelihoods import get_likelihood

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 4, bias=False), nn.Tanh(),
                        nn.Linear(4, 3), nn.Sigmoid()).double()
    X = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    view = analysis_view(net, torch.float64)
    for layers in ([0, 1, 2], [1, 2], [0, 2]):
        P = view.n_params(layers)
        V = torch.randn(P, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        FV = ChainFisherProduct(view, X, get_likelihood(likelihood), layers, chunk_size=7)(V)
        torch.testing.assert_close(FV, O.exact_fisher(net, X, likelihood, layers=layers) @ V, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(FV, fisher_matrix_product(net, X, likelihood, V, layers=layers), rtol=1e-10,
                                   atol=1e-13)
    with pytest.raises(ValueError, match="V must be a"):
        ChainFisherProduct(view, X, get_likelihood(likelihood), [0, 1, 2])(torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size must be"):
        ChainFisherProduct(view, X, get_likelihood(likelihood), [0, 1, 2], chunk_size=0)


def test_matrix_free_comparison_same_on_chain_and_capture_paths():
    """compare_approximations(method="matrix-free") on a chain (output-Fisher set-up, cached-primal products)
    gives the values of the same network read through a probe pass (capture set-up, fisher_matrix_product)."""
    from kfac_lens.curvature.quality import compare_approximations
    from kfac_lens.nets import NetworkView

    net = _net()
    X = torch.randn(50, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(approximations=["kfac", "kfac-tridiag", "ekfac", "diagonal"], gamma=0.1, method="matrix-free",
              probes=6, top_k=3, spectra=["kfac-tridiag"])
    chain = compare_approximations(net, X, "bernoulli", **kw)
    probed = compare_approximations(NetworkView(net, example_input=X[:2]), X, "bernoulli", **kw)
    for col in ("rel_frobenius", "ci_low", "ci_high", "precond_cond"):
        torch.testing.assert_close(torch.tensor(chain[col].values), torch.tensor(probed[col].values), rtol=1e-8,
                                   atol=0, equal_nan=True)
