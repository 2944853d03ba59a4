"""Appendix B (MATH.md §6): F − F̃ as joint cumulants, against the oracle's partition sums."""

from __future__ import annotations

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
