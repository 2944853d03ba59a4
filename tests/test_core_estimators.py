"""Matrix-free estimators: Lanczos (plain and generalized), CG, the randomized Frobenius ratio and its interval,
and compare_approximations(method="matrix-free") against the dense values on small networks."""

from __future__ import annotations

import math

import oracle as O
import pytest
import torch

from kfac_lens import (
    APPROXIMATIONS,
    compare_approximation_blocks,
    compare_approximations,
    conjugate_gradient,
    lanczos,
    relative_frobenius_errors,
)
from kfac_lens.curvature.estimators import ratio_estimate, student_quantile

pytestmark = pytest.mark.usefixtures("single_thread")

NETS = [("d2", "gaussian"), ("d3", "categorical"), ("d4", "bernoulli")]


def f64(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def spd(n: int, eigs, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * f64(eigs)) @ Q.T


# ----------------------------------------------------------------------------- Lanczos and CG on matrices
def test_lanczos_recovers_repeated_eigenvalues_when_run_to_n():
    """A Krylov space holds one copy of a repeated eigenvalue; the restart on breakdown finds the others."""
    eigs = [5.0, 5.0, 5.0, 3.0, 2.0, 2.0] + [1.0 / (i + 1) for i in range(24)]
    A = spd(30, eigs)
    full = lanczos(lambda V: A @ V, 30, 6, tol=0.0, generator=torch.Generator().manual_seed(1))
    assert full.steps == 30 and not full.converged
    assert O.rel(full.eigenvalues, torch.linalg.eigvalsh(A).flip(0)) < 1e-12
    # Stopped early, the top six Ritz values are eigenvalues and hold every distinct one among the largest; whether
    # rounding has seeded a repeated eigenvalue's other copies by then varies with the seed and the BLAS kernels.
    res = lanczos(lambda V: A @ V, 30, 6, generator=torch.Generator().manual_seed(1))
    assert res.converged and all(min(abs(t - e) for e in eigs) < 1e-10 for t in res.top(6))
    assert {5.0, 3.0, 2.0} <= {round(t, 8) for t in res.top(6)}


def test_lanczos_stops_early_on_a_decaying_spectrum():
    n = 300
    A = spd(n, [10.0 * 0.7 ** i for i in range(n)], seed=2)
    res = lanczos(lambda V: A @ V, n, 5, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.steps < 60
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert float((f64(res.top(5)) - ref).abs().max()) < 1e-10 * float(ref[0])
    assert bool((res.residuals[:5] <= 1e-10 * float(ref[0])).all())


def test_long_runs_show_progress_bars_unless_quiet(capsys, monkeypatch):
    """Lanczos counts its steps and the Frobenius estimate its products on a bar: forced here (``progress``), by
    themselves for operators of ≥ LARGE_OPERATOR rows, never for small ones or under KFAC_LENS_QUIET."""
    from kfac_lens.progress import LARGE_OPERATOR, shown

    A = spd(40, [1.0 / (i + 1) for i in range(40)])
    lanczos(lambda V: A @ V, 40, 3, generator=torch.Generator().manual_seed(0), progress=True, desc="Lanczos here")
    relative_frobenius_errors(lambda V: A @ V, {"half": lambda V: 0.5 * (A @ V)}, 40, 8,
                              torch.Generator().manual_seed(0), progress=True)
    err = capsys.readouterr().err
    assert "Lanczos here" in err and "Frobenius estimate" in err
    lanczos(lambda V: A @ V, 40, 3, generator=torch.Generator().manual_seed(0))
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("KFAC_LENS_QUIET", raising=False)
    assert shown(long=True) and not shown(long=False) and shown(long=False, progress=True)
    monkeypatch.setenv("KFAC_LENS_QUIET", "1")
    assert not shown(long=True) and shown(long=True, progress=True) and LARGE_OPERATOR > 40


def test_generalized_lanczos_and_cg_with_a_preconditioner():
    """Eigenvalues of M⁻¹A from M⁻¹ alone (M-inner product), and preconditioned CG's solution."""
    n = 40
    A = spd(n, [math.exp(-i / 4) for i in range(n)], seed=3)
    M = spd(n, [1.0 + i for i in range(n)], seed=4)
    Mi = torch.linalg.inv(M)
    ref = O.generalized_eigvals(A, M)
    res = lanczos(lambda V: A @ V, n, 5, precondition=lambda V: Mi @ V, tol=1e-12,
                  generator=torch.Generator().manual_seed(2))
    assert res.converged and res.steps < n and O.rel(f64(res.top(5)), ref[:5]) < 1e-10
    assert res.condition <= float(ref[0] / ref[-1])  # a lower bound before the bottom converges
    res = lanczos(lambda V: A @ V, n, n, precondition=lambda V: Mi @ V, generator=torch.Generator().manual_seed(2))
    assert O.rel(res.eigenvalues, ref) < 1e-10
    assert res.condition == pytest.approx(float(ref[0] / ref[-1]), rel=1e-8)
    b = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.linalg.solve(A, b)
    for pre in (None, lambda V: Mi @ V):
        cg = conjugate_gradient(lambda V: A @ V, b, pre, tol=1e-12)
        assert cg.converged and cg.solve_residual <= 1e-12 and O.rel(cg.solution, x) < 1e-8
    with pytest.raises(ValueError, match="start vector is zero"):
        conjugate_gradient(lambda V: A @ V, torch.zeros(n, dtype=torch.float64))


# ----------------------------------------------------------------------------- the Frobenius ratio
def test_ratio_estimate_numbers_and_degenerate_cases():
    # no probes: the exact parts; the interval is the value
    e = ratio_estimate(torch.zeros(0, 0), torch.zeros(0, 0), 1.0, 4.0)
    assert (e.value, e.ci_low, e.ci_high) == (0.5, 0.5, 0.5)
    # numerator images equal to half the denominator's: T = 1/4 exactly, and a point interval
    W = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = ratio_estimate((W / 2).T @ (W / 2), W.T @ W)
    assert e.value == pytest.approx(0.5) and e.ci_low == pytest.approx(0.5) and e.ci_high == pytest.approx(0.5)
    # two probes of a rank-one denominator: b is not significantly positive, so no upper bound
    ones = torch.ones(2, 2, dtype=torch.float64)
    e = ratio_estimate(0.25 * ones, ones)
    assert e.value == pytest.approx(0.5) and e.ci_low == 0.0 and e.ci_high == math.inf
    assert math.isnan(ratio_estimate(W.T @ W, torch.zeros(6, 6)).value)
    assert student_quantile(0.95, 1) == pytest.approx(12.7062, rel=1e-4)
    assert student_quantile(0.95, 9) == pytest.approx(2.2622, rel=1e-3)


def test_frobenius_estimator_is_exact_with_a_full_basis_and_unbiased():
    n = 25
    F = spd(n, [2.0 ** -i for i in range(n)], seed=6)
    B = spd(n, [1.5 ** -i for i in range(n)], seed=7)
    truth = float((F - B).norm() / F.norm())
    full = relative_frobenius_errors(lambda V: F @ V, {"b": lambda V: B @ V}, n, 5,
                                     basis=torch.eye(n, dtype=torch.float64))["b"]
    assert full.value == pytest.approx(truth, rel=1e-12) and full.ci_high - full.ci_low < 1e-6
    gen = torch.Generator().manual_seed(8)
    nums = [relative_frobenius_errors(lambda V: F @ V, {"b": lambda V: B @ V}, n, 4, gen)["b"].num
            for _ in range(400)]
    assert sum(nums) / len(nums) == pytest.approx(float((F - B).square().sum()), rel=0.05)


# ----------------------------------------------------------------------------- compare_approximations matrix-free
@pytest.mark.parametrize("kind,family", NETS)
def test_matrix_free_spectra_and_directions_match_dense(kind, family):
    """Lanczos gives the top-k eigenvalues of F to 1e-8 of the largest when it stops on its residual bound
    (they are simple here); run to P steps (tol=0) also those of F̆⁻¹F, F̂⁻¹F, ... (damped) with their
    multiplicities, and the condition numbers; CG gives the damped natural-gradient cosines."""
    net, X, y = O.problem(kind, family)
    P = sum(O.sizes(net))
    kw = dict(y=y, gamma=0.1, top_k=5, spectra=["kfac-blockdiag", "kfac-tridiag", "ekfac", "diagonal"])
    dense = compare_approximations(net, X, family, **kw).set_index("approximation")
    top_F = f64(dense.top_eigs_F.iloc[0])
    early = compare_approximations(net, X, family, "diagonal", method="matrix-free", top_k=5, tol=1e-9, probes=2)
    assert early.attrs["lanczos_F_converged"] and early.attrs["lanczos_F_steps"] < P
    assert float((f64(early.top_eigs_F[0]) - top_F).abs().max()) < 1e-8 * float(top_F[0])
    free = compare_approximations(net, X, family, method="matrix-free", max_steps=P, tol=0.0, cg_tol=1e-12,
                                  probes=4, **kw).set_index("approximation")
    assert float((f64(free.top_eigs_F.iloc[0]) - top_F).abs().max()) < 1e-8 * float(top_F[0])
    for name in kw["spectra"]:
        d, f = f64(dense.loc[name, "top_eigs_precond"]), f64(free.loc[name, "top_eigs_precond"])
        assert float((d - f).abs().max()) < 1e-8 * float(d[0]), name
        assert free.loc[name, "precond_cond"] == pytest.approx(dense.loc[name, "precond_cond"], rel=1e-8)
    for name in APPROXIMATIONS:
        assert free.loc[name, "ng_cosine"] == pytest.approx(dense.loc[name, "ng_cosine"], abs=1e-8), name
    for name in ("kfac", "blockdiag-exact"):
        assert free.loc[name, "top_eigs_precond"] is None and math.isnan(free.loc[name, "precond_cond"])
    assert free.attrs["fisher_products"] > 0 and free.attrs["lanczos_F_steps"] <= P


def test_matrix_free_is_exact_when_the_deflation_basis_spans_everything():
    net, X, _ = O.problem("d2", "gaussian")
    P = sum(O.sizes(net))
    dense = compare_approximations(net, X, "gaussian", top_k=3)
    free = compare_approximations(net, X, "gaussian", method="matrix-free", top_k=3, max_steps=P, tol=0.0, probes=3)
    assert list(free.approximation) == list(dense.approximation)
    for d, f, lo, hi in zip(dense.rel_frobenius, free.rel_frobenius, free.ci_low, free.ci_high):
        assert f == pytest.approx(d, rel=1e-9) and hi - lo < 1e-6


def coverage(kind, family, trials, probes=10, **kw) -> dict[str, float]:
    """Share of seeded trials whose interval contains the dense value, per approximation."""
    net, X, _ = O.problem(kind, family)
    dense = compare_approximations(net, X, family, top_k=2).set_index("approximation").rel_frobenius
    hits = dict.fromkeys(dense.index, 0)
    for seed in range(trials):
        free = compare_approximations(net, X, family, method="matrix-free", probes=probes, seed=seed, top_k=2,
                                      **kw).set_index("approximation")
        for name in hits:
            hits[name] += bool(free.ci_low[name] <= dense[name] <= free.ci_high[name])
    return {name: h / trials for name, h in hits.items()}


def test_matrix_free_intervals_cover_the_dense_value_fast():
    """20 seeded trials with 10 probes, deflated by a 3-step Krylov basis (so the probes matter)."""
    cov = coverage("d3", "categorical", 20, max_steps=3)
    assert min(cov.values()) >= 0.9, cov


@pytest.mark.slow
@pytest.mark.parametrize("deflate", [True, False])
@pytest.mark.parametrize("kind,family", NETS)
def test_matrix_free_intervals_cover_the_dense_value(kind, family, deflate):
    """50 seeded trials per network and approximation: the 95% intervals hold the dense value ≥ 90% of the time."""
    cov = coverage(kind, family, 50, deflate=deflate, max_steps=3)
    assert min(cov.values()) >= 0.9, cov


def test_matrix_free_blocks_match_dense():
    net, X, _ = O.problem("d3", "gaussian")
    names = ["kfac-blockdiag", "kfac-tridiag", "blockdiag-exact"]
    dense = compare_approximation_blocks(net, X, "gaussian", names)
    free = compare_approximation_blocks(net, X, "gaussian", names, method="matrix-free", probes=12, seed=1)
    assert free.attrs["fisher_products"] == 3 * 12
    assert list(free.columns) == list(dense.columns) and len(free) == len(dense) == 27
    inside = ((free.ci_low <= dense.rel_frobenius + 1e-12) & (dense.rel_frobenius <= free.ci_high + 1e-12))
    assert inside.mean() >= 0.85
    exact = free[free.approximation == "blockdiag-exact"]
    assert (exact[exact.kind == "diagonal"].rel_frobenius < 1e-10).all()
    assert exact[exact.kind != "diagonal"].rel_frobenius.tolist() == pytest.approx([1.0] * 6, abs=1e-12)
