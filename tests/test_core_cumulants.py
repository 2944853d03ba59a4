"""Appendix B (docs/math.md §6): F − F̃ as joint cumulants, against the oracle's partition sums."""

from __future__ import annotations

import importlib
import time

import oracle as O
import pytest
import torch

from kfac_lens import cumulant_terms, exact_fisher, kronecker_factors

pytestmark = pytest.mark.usefixtures("single_thread")

TERMS = ("difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3")
N = 8


def problem(kind="d3", n=N):
    net = O.make_net(kind)
    return net, O.make_inputs(net, n)


def residual_ratio(ct) -> float:
    return float(ct.residual.norm()) / float(ct.difference.norm())


def test_oracle_partition_counts():
    assert [len(O.set_partitions(list(range(n)))) for n in (1, 2, 3, 4)] == [1, 2, 5, 15]
    parts4 = O.set_partitions(list("abcd"))
    by_size = {}
    for p in parts4:
        by_size[len(p)] = by_size.get(len(p), 0) + 1
    # κ4: 1 partition at +1, 7 at −1 (four 3+1, three 2+2), 6 at +2, 1 at −6
    assert by_size == {1: 1, 2: 7, 3: 6, 4: 1}


@pytest.mark.parametrize("kind,k,l", [("d3", 0, 0), ("d3", 0, 1), ("d3", 1, 2), ("d3", 2, 0), ("d4", 1, 3),
                                      ("d4", 0, 1)])
def test_categorical_exact_terms(kind, k, l):
    net, X = problem(kind)
    ct = cumulant_terms(net, X, "categorical", k, l)
    assert ct.exact and ct.estimator == "exact" and (ct.k, ct.l) == (k, l)
    o = O.cumulant_terms(net, X, "categorical", k, l)
    ref = float(o["difference"].norm())
    assert ref > 0
    for name in TERMS:
        t = getattr(ct, name)
        assert t.shape == o[name].shape
        assert float((t - o[name]).norm()) <= 1e-10 * ref, name
    assert residual_ratio(ct) < 1e-12
    # the terms are not trivially zero and do not each equal the difference
    assert float(ct.kappa4.norm()) > 1e-6 * ref
    assert O.rel(ct.kappa4, ct.difference) > 1e-6


def test_difference_is_the_block_of_f_minus_f_tilde():
    """as_block uses the paper layout: (F − F̃)_{k,l} from the exact Fisher and the factors."""
    net, X = problem("d4")
    F = exact_fisher(net, X, "categorical")
    Ft = kronecker_factors(net, X, "categorical").dense()
    szs = O.sizes(net)
    for k, l in [(0, 0), (1, 2), (3, 0)]:
        ct = cumulant_terms(net, X, "categorical", k, l)
        blk = ct.as_block("difference")
        assert O.rel(blk, O.block(F, szs, k, l) - O.block(Ft, szs, k, l)) < 1e-10
        ref = O.cumulant_terms(net, X, "categorical", k, l)["kappa4"].reshape(blk.shape)
        assert O.rel(ct.as_block("kappa4"), ref) < 1e-10


def test_oracle_identity_is_exact_for_enumerated_bernoulli():
    """Sanity of the oracle: with y enumerated exactly (2^C binary vectors) the identity holds for Bernoulli."""
    net, X = problem("d3")
    o = O.cumulant_terms(net, X, "bernoulli", 0, 1)
    res = o["difference"] - o["kappa4"] - o["mean_a1_kappa3"] - o["mean_a2_kappa3"]
    assert float(res.norm()) < 1e-12 * float(o["difference"].norm())


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_empirical_fisher_breaks_the_identity(family):
    net, X = problem("d3")
    y = O.random_targets(family, N, O.n_outputs(net), torch.Generator().manual_seed(2))
    ct = cumulant_terms(net, X, family, 0, 1, estimator="empirical", y=y)
    assert ct.estimator == "empirical" and not ct.exact
    o = O.cumulant_terms(net, X, family, 0, 1, y=y)
    ref = float(o["difference"].norm())
    for name in TERMS:
        assert float((getattr(ct, name) - o[name]).norm()) <= 1e-10 * ref, name
    assert residual_ratio(ct) > 1e-3


def test_bernoulli_sampled_residual_shrinks_with_samples():
    net, X = problem("d3")
    exact = O.cumulant_terms(net, X, "bernoulli", 0, 1)
    few = cumulant_terms(net, X, "bernoulli", 0, 1, samples=4, seed=0)
    many = cumulant_terms(net, X, "bernoulli", 0, 1, samples=1024, seed=0)
    assert few.estimator == "mc" and not few.exact
    for ct in (few, many):
        for name in TERMS:
            assert torch.isfinite(getattr(ct, name)).all()
    r_few, r_many = residual_ratio(few), residual_ratio(many)
    assert r_many < r_few / 4
    assert r_many < 0.05
    assert O.rel(many.difference, exact["difference"]) < O.rel(few.difference, exact["difference"])
    again = cumulant_terms(net, X, "bernoulli", 0, 1, samples=4, seed=0)
    assert torch.equal(again.difference, few.difference)


def test_summary_table():
    net, X = problem("d3")
    ct = cumulant_terms(net, X, "categorical", 0, 1)
    df = ct.summary()
    assert list(df["term"]) == ["difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3", "residual"]
    row = df.set_index("term")
    assert row.loc["kappa4", "frobenius"] == pytest.approx(float(ct.kappa4.norm()), rel=1e-12)
    assert row.loc["difference", "relative_to_difference"] == pytest.approx(1.0)
    assert row.loc["residual", "relative_to_difference"] < 1e-12


def test_gaussian_exact_enumeration_is_refused():
    net, X = problem("d3")
    with pytest.raises(ValueError, match="estimator='mc'"):
        cumulant_terms(net, X, "gaussian", 0, 1, estimator="exact")
    with pytest.raises(ValueError, match="pass y="):
        cumulant_terms(net, X, "categorical", 0, 1, estimator="empirical")


# ----------------------------------------------------------------------------- numerics, memory, chunking
MEAN = 1e4


def large_mean_problem(kind="d3", n=N):
    """Inputs of mean 1e4; the first Linear's bias cancels the mean, so pre-activations stay O(1)."""
    net = O.make_net(kind)
    X = MEAN + O.make_inputs(net, n)
    lin = O.linears(net)[0]
    with torch.no_grad():
        lin.bias -= lin.weight @ torch.full((lin.in_features,), MEAN, dtype=torch.float64)
    return net, X


@pytest.mark.parametrize("kind,k,l,family", [("d3", 0, 0, "categorical"), ("d3", 0, 2, "categorical"),
                                             ("d3", 2, 0, "categorical"), ("d4", 0, 0, "categorical"),
                                             ("d3", 0, 0, "bernoulli")])
def test_large_mean_activations_do_not_cancel(kind, k, l, family):
    """Appendix B terms from centred moments: with ā of mean 1e4 the raw-moment partition formula loses
    ~1e-7 of κ4; the centred computation agrees with the centred oracle to rounding."""
    net, X = large_mean_problem(kind)
    _, _, s = O.forward(net, X, record=True)
    assert float(X.mean()) == pytest.approx(MEAN, rel=1e-3) and float(s[0].abs().max()) < 20
    y = None
    if family == "bernoulli":  # no exact enumeration in the library: use the training-target estimator
        y = O.random_targets(family, N, O.n_outputs(net), torch.Generator().manual_seed(3))
    ct = cumulant_terms(net, X, family, k, l, estimator="empirical" if y is not None else None, y=y)
    o = O.centred_cumulant_terms(net, X, family, k, l, y=y)
    for name in TERMS:
        assert O.rel(getattr(ct, name), o[name]) < 1e-9, name
    if y is None:
        assert residual_ratio(ct) < 1e-12


def test_centred_oracle_matches_the_partition_oracle():
    """The centred oracle equals the raw partition sums on O(1) data; on the large-mean problem the raw
    partition sums cancel (which is why the test above uses the centred oracle)."""
    net, X = problem("d4")
    for k, l in [(0, 0), (1, 3)]:
        raw, cen = O.cumulant_terms(net, X, "categorical", k, l), O.centred_cumulant_terms(net, X, "categorical", k, l)
        for name in TERMS:
            assert O.rel(cen[name], raw[name]) < 1e-12, name
    net, X = large_mean_problem("d3")
    raw, cen = O.cumulant_terms(net, X, "categorical", 0, 0), O.centred_cumulant_terms(net, X, "categorical", 0, 0)
    assert O.rel(raw["kappa4"], cen["kappa4"]) > 1e-10


def test_memory_guard_raises_before_any_work(monkeypatch):
    """A 785×1000 first layer: block (0, 0) needs ~31 TB. The error names k, l and the way out, before
    any forward pass or allocation of the 4-index tensors."""
    from torch import nn

    from kfac_lens.errors import DenseTooLargeError

    mod = importlib.import_module("kfac_lens.curvature.cumulants")
    net = nn.Sequential(nn.Linear(785, 1000, dtype=torch.float64), nn.Sigmoid(),
                        nn.Linear(1000, 10, dtype=torch.float64))
    X = torch.rand(2, 785, dtype=torch.float64)

    def no_work(*a, **kw):
        raise AssertionError("ran the network before checking the memory needed")

    monkeypatch.setattr(mod, "forward", no_work)
    monkeypatch.setattr(mod, "check_inputs", no_work)
    t0 = time.perf_counter()
    with pytest.raises(DenseTooLargeError) as info:
        cumulant_terms(net, X, "categorical", 0, 0)
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "k=0" in msg and "l=0" in msg and "smaller layers" in msg and "fewer units" in msg
    with pytest.raises(DenseTooLargeError, match="k=1, l=0"):
        cumulant_terms(net, X, "categorical", 1, 0)


def test_memory_guard_honours_max_bytes():
    from kfac_lens.errors import DenseTooLargeError

    net, X = problem("d3")
    T = 6 * 7 * 8 * 3  # a_dim_0 · d_0 · a_dim_1 · d_1
    with pytest.raises(DenseTooLargeError, match=r"k=0, l=1"):
        cumulant_terms(net, X, "categorical", 0, 1, max_bytes=5 * T * 8)  # 5 tensors plus a working set
    ct = cumulant_terms(net, X, "categorical", 0, 1, max_bytes=10 * 2**20)
    ref = cumulant_terms(net, X, "categorical", 0, 1)
    for name in TERMS:
        assert O.rel(getattr(ct, name), getattr(ref, name)) < 1e-14, name


@pytest.mark.parametrize("case", ["d4-exact", "d3-empirical", "large-mean"])
def test_chunked_equals_unchunked(case):
    """Two passes over chunks of cases give the one-chunk result to rounding. For the large-mean problem the
    first layer's pre-activations (1e4-sized terms summing to O(1)) themselves round differently per
    batch size, so its tolerance is wider."""
    y, est, tol = None, None, 1e-12
    if case == "d4-exact":
        (net, X), blocks = problem("d4", n=11), [(0, 0), (1, 3), (3, 2)]
    elif case == "d3-empirical":
        (net, X), blocks = problem("d3", n=11), [(0, 1), (2, 2)]
        y, est = O.random_targets("bernoulli", 11, O.n_outputs(net), torch.Generator().manual_seed(4)), "empirical"
    else:
        (net, X), blocks, tol = large_mean_problem("d3", n=11), [(0, 0), (0, 2)], 1e-10
    for k, l in blocks:
        whole = cumulant_terms(net, X, "bernoulli" if est else "categorical", k, l, estimator=est, y=y,
                               chunk_size=11)
        for chunk in (1, 3, 10, 100):
            part = cumulant_terms(net, X, "bernoulli" if est else "categorical", k, l, estimator=est, y=y,
                                  chunk_size=chunk)
            for name in TERMS:
                assert O.rel(getattr(part, name), getattr(whole, name)) < tol, (k, l, chunk, name)


def test_sampled_passes_see_the_same_targets():
    """With several chunks the sampled estimator runs two passes (means, then centred sums); both must
    draw the same targets, from a seed, a generator or the global RNG."""
    from kfac_lens.likelihoods import Gaussian

    class Recording(Gaussian):
        def __init__(self):
            self.draws = []

        def sample(self, z, generator=None):
            out = super().sample(z, generator)
            self.draws.append(out.clone())
            return out

    net, X = problem("d3")
    lik = Recording()
    ct = cumulant_terms(net, X, lik, 0, 1, samples=2, seed=5, chunk_size=3)
    assert len(lik.draws) == 2 * 3 * 2  # two passes × three chunks × two samples
    half = len(lik.draws) // 2
    for first, second in zip(lik.draws[:half], lik.draws[half:]):
        assert torch.allclose(first, second, rtol=0, atol=1e-12)
    again = cumulant_terms(net, X, "gaussian", 0, 1, samples=2, seed=5, chunk_size=3)
    assert O.rel(again.kappa4, ct.kappa4) < 1e-12
    gen = torch.Generator().manual_seed(5)
    from_gen = cumulant_terms(net, X, "gaussian", 0, 1, samples=2, generator=gen, chunk_size=3)
    assert O.rel(from_gen.difference, ct.difference) < 1e-12
    torch.manual_seed(9)
    g1 = cumulant_terms(net, X, "gaussian", 0, 1, samples=2, seed=None, chunk_size=3)
    torch.manual_seed(9)
    g2 = cumulant_terms(net, X, "gaussian", 0, 1, samples=2, seed=None, chunk_size=3)
    assert O.rel(g1.difference, g2.difference) < 1e-12


def test_bad_samples_and_chunk_size():
    net, X = problem("d3")
    for bad in (2.5, 0, -1, True, "8"):
        with pytest.raises(ValueError, match="samples"):
            cumulant_terms(net, X, "gaussian", 0, 1, samples=bad)
    with pytest.raises(ValueError, match="samples"):
        cumulant_terms(net, X, "categorical", 0, 1, samples=0)
    for bad in (0, -3, 2.5, "4", True):
        with pytest.raises(ValueError, match="chunk_size"):
            cumulant_terms(net, X, "categorical", 0, 1, chunk_size=bad)
    with pytest.raises((ValueError, TypeError), match="k|layer"):
        cumulant_terms(net, X, "categorical", 1.9, 1)
