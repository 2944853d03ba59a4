"""The pieces of a cheap K-FAC iteration against the library's independent computations (float64):

- the gradient pass's gradient, and S₁'s factor statistics equal to compute_factors' with the same sampled
  targets (Appendix D, Algorithm 2);
- Appendix J products from the gradient pass's activations: ``[vᵢᵀFvⱼ]`` on a subset S₂ equals
  ``fisher_gram`` (which runs its own linearised forward pass), also through the fallback for other modules;
- the γ search in the factors' eigenbasis: Δ_γ = −F̆_γ⁻¹∇h of the block-diagonal inverse (Section 3.2, E.3);
- the batched, sync-free solve of M over span{Δ, δ₀} equals :class:`SubspaceModel` (E.4, F), degenerate
  cases included.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.capture import forward
from kfac_lens.curvature.factors import compute_factors
from kfac_lens.optim import SubspaceModel
from kfac_lens.optim.fisher_products import fisher_gram_from_pass, linearisation_plan
from kfac_lens.optim.passes import GradientPass, gradient_pass, subset_statistics
from kfac_lens.optim.quadratic import SOLUTION_FIELDS, solve_subspaces

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


class Softplus2(nn.Module):
    """A parameter-free module the fast J-product path does not know (forces the fallback)."""

    def forward(self, a):
        return nn.functional.softplus(a) * 0.5


def net_with(activations, sizes=(5, 7, 6, 4), seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1], bias=i != 1))
        if i < len(sizes) - 2:
            mods.append(activations[i % len(activations)]())
    return nn.Sequential(*mods).to(F64)


def data(n=40, d=5, C=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, C, (n,), generator=g)


def random_mats(view, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*L.shape, generator=g, dtype=F64) for L in view.layers] for _ in range(n)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("estimator", ["mc", "exact"])
def test_gradient_pass_and_subset_statistics(estimator):
    """The pass's gradient is autograd's; S₁'s statistics equal (bit for bit) those of compute_factors on S₁
    drawing the same sampled targets."""
    net = net_with([nn.Tanh, nn.Sigmoid])
    view = K.NetworkView(net)
    X, y = data()
    lik = K.get_likelihood("categorical")
    layers = list(range(len(view)))
    batch = gradient_pass(view, lik, X, y, layers)
    loss = nn.functional.cross_entropy(net(X), y)
    loss.backward()
    assert float(batch.loss) == pytest.approx(float(loss.detach()), rel=1e-14)
    for k, (G, ref) in enumerate(zip(batch.data_grad, view.gradient_matrices())):
        assert rel(G, ref) < 1e-13
        g_cols, a_rows = batch.low_rank_pieces(k)
        assert rel(g_cols @ a_rows, G) < 1e-14
    S1 = torch.tensor([7, 3, 31, 12, 0])
    stats = subset_statistics(view, lik, X[S1], layers, estimator, torch.Generator().manual_seed(5), "tridiag")
    sep = compute_factors(view, X[S1], lik, layers, estimator, samples=1,
                          generator=torch.Generator().manual_seed(5), pairs="tridiag", progress=False)
    assert stats.pairs == sep.pairs
    for kl in sep.pairs:
        assert torch.equal(stats.A[kl], sep.A[kl]) and torch.equal(stats.G[kl], sep.G[kl])


@pytest.mark.parametrize("activations", [[nn.Tanh, nn.Sigmoid], [lambda: nn.ReLU(inplace=True)], [Softplus2]],
                         ids=["tanh-sigmoid", "relu-inplace", "fallback"])
@pytest.mark.parametrize("family", ["categorical", "bernoulli", "gaussian"])
def test_gram_from_the_gradient_pass_equals_fisher_gram(family, activations):
    net = net_with(activations)
    view = K.NetworkView(net)
    X, _ = data()
    y = {"categorical": lambda: torch.randint(0, 4, (40,)), "bernoulli": lambda: torch.rand(40, 4, dtype=F64),
         "gaussian": lambda: torch.randn(40, 4, dtype=F64)}[family]()
    lik = K.get_likelihood(family)
    plan = linearisation_plan(view)
    assert (plan is None) == (activations == [Softplus2])
    vecs = random_mats(view, 3)
    S2 = torch.tensor([4, 17, 2, 39, 22, 11, 30])
    ref = K.fisher_gram(net, X[S2], family, vecs)
    batch = gradient_pass(view, lik, X, y, list(range(3)))
    G = fisher_gram_from_pass(view, lik, batch, S2, vecs, plan)
    assert G.dtype == F64 and torch.equal(G, G.T)
    assert rel(G, ref) < 1e-12
    # the drop-in form: layer inputs as recorded by the hooks, without the homogeneous 1
    inputs = {k: batch.a[k][:, :view.layers[k].d_in] for k in range(3)}
    raw = GradientPass(X, y, batch.loss, batch.data_grad, inputs, None, batch.z)
    assert rel(fisher_gram_from_pass(view, lik, raw, S2, vecs, plan), ref) < 1e-12
    assert rel(fisher_gram_from_pass(view, lik, raw, None, vecs, plan), K.fisher_gram(net, X, family, vecs)) < 1e-12
    # in chunks of cases (many cases: the tangents of one chunk at a time), all cases or a subset
    assert rel(fisher_gram_from_pass(view, lik, batch, None, vecs, plan, chunk_size=6),
               K.fisher_gram(net, X, family, vecs)) < 1e-12
    assert rel(fisher_gram_from_pass(view, lik, batch, S2, vecs, plan, chunk_size=3), ref) < 1e-12


def test_batched_subspace_solve_equals_subspace_model():
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(4):
        A = torch.randn(2, 2, generator=g, dtype=F64)
        B = torch.randn(2, 2, generator=g, dtype=F64)
        cases.append((A @ A.T, B @ B.T + 0.1 * torch.eye(2, dtype=F64), torch.randn(2, generator=g, dtype=F64)))
    v = torch.tensor([1.0, 2.0], dtype=F64)
    cases.append((2.0 * torch.outer(v, v), torch.outer(v, v), -v))  # δ₀ ∥ Δ: singular
    cases.append((torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64), torch.tensor([[1.0, 0.0], [0.0, 0.0]],
                                                                                    dtype=F64),
                  torch.tensor([-1.0, 0.0], dtype=F64)))  # δ₀ = 0
    gF, gI, b = (torch.stack([c[i] for c in cases]) for i in range(3))
    for damping in (0.0, 0.1):
        out = solve_subspaces(gF, gI, b, damping, rescale=True)
        for row, (f, i, bb) in zip(out, cases):
            sub = SubspaceModel(f, i, bb, damping)
            c = sub.minimize()
            s = dict(zip(SOLUTION_FIELDS, row.tolist()))
            assert [s["alpha"], s["mu"]] == pytest.approx(c.tolist(), rel=1e-12, abs=1e-15)
            assert s["M"] == pytest.approx(sub.value(c), rel=1e-12)
            assert (s["dFd"], s["gd"], s["Q00"]) == (float(f[0, 0]), float(bb[0]), float(sub.Q[0, 0]))
        one = solve_subspaces(gF[:, :1, :1], gI[:, :1, :1], b[:, :1], damping, rescale=True)
        for row, (f, i, bb) in zip(one, cases):
            c = SubspaceModel(f[:1, :1], i[:1, :1], bb[:1], damping).minimize()
            assert float(row[0]) == pytest.approx(float(c[0]), rel=1e-14) and float(row[1]) == 0.0
    raw = solve_subspaces(gF[:, :1, :1], gI[:, :1, :1], b[:, :1], 0.1, rescale=False)
    assert (raw[:, 0] == 1.0).all() and (raw[:, 1] == 0.0).all()
    assert torch.allclose(raw[:, 2], 0.5 * (gF[:, 0, 0] + 0.1 * gI[:, 0, 0]) + b[:, 0], rtol=1e-14)


def test_forward_records_what_the_fast_products_need():
    """The fast path reads φ'(s_k) off the next layer's input: check that input is φ(s_k) of the pass."""
    net = net_with([nn.Sigmoid])
    view = K.NetworkView(net)
    X, _ = data()
    z, a, s = forward(view, X, [0, 1, 2], track=False)
    assert torch.equal(a[1][:, :view.layers[1].d_in], torch.sigmoid(s[0]))
    assert linearisation_plan(view)[0] is not None and linearisation_plan(view)[2] is None


def test_objective_in_chunks_of_cases_equals_one_pass(monkeypatch):
    """h(θ) on many cases (Figure 7's analysis) is evaluated chunk by chunk: the same value."""
    import kfac_lens.optim.kfac as kfac_module

    net = net_with([nn.Tanh, nn.Sigmoid])
    X, _ = data()
    y = torch.randint(0, 4, (40,))
    opt = K.KFAC(net, "categorical", eta=1e-3)
    whole = opt._objective(X, y, 1e-3)
    monkeypatch.setattr(kfac_module, "OBJECTIVE_CHUNK", 7)
    assert opt._objective(X, y, 1e-3) == pytest.approx(whole, rel=1e-13)
