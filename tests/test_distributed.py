"""``distributed=``: each rank passes its shard of the cases and every rank receives the result for all of them.

Two gloo processes on 127.0.0.1 (NCCL on 2 GPUs under ``kfac-lens gpu-check``). Every result is compared
with one process on the concatenated cases, computed here in the parent, to 1e-10 in float64; the shards
are uneven (23 and 17 cases). Sampled estimators are compared with the shard-size-weighted mean of one
process per shard seeded as the documented per-rank stream (``rank_seed``).
"""

from __future__ import annotations

import oracle as O
import pytest
import torch
from distributed_ranks import run_ranks

import kfac_lens as K
from kfac_lens.distributed import CaseShards, rank_seed

F64 = torch.float64
SPLIT = (0, 23, 40)  # rank 0 takes cases 0..22, rank 1 cases 23..39
FAMILIES = ("categorical", "gaussian")


def problem(family="categorical"):
    net = O.make_net("d4", seed=3)
    X = O.make_inputs(net, SPLIT[-1], seed=4)
    y = O.random_targets(family, SPLIT[-1], O.n_outputs(net), torch.Generator().manual_seed(5))
    v = torch.randn(sum(O.sizes(net)), dtype=F64, generator=torch.Generator().manual_seed(6))
    return net, X, y, v


def shard(t, rank):
    return t[SPLIT[rank]:SPLIT[rank + 1]]


def curvature_on_rank(rank, world_size, device):
    return {family: curvature_of_family(rank, device, family) for family in FAMILIES}


def curvature_of_family(rank, device, family):
    net, X, y, v = problem(family)
    net, X, y, v = net.to(device), shard(X, rank).to(device), shard(y, rank).to(device), v.to(device)
    d = dict(distributed=True)
    f = K.kronecker_factors(net, X, family, **d)
    return {
        "exact": K.exact_fisher(net, X, family, **d).cpu(),
        "empirical": K.empirical_fisher(net, X, y, family, **d).cpu(),
        "mc": K.mc_fisher(net, X, family, samples=3, seed=11, **d).cpu(),
        "fvp": K.fisher_vector_product(net, X, family, v, **d).cpu(),
        "gram": K.fisher_gram(net, X, family, [v, 2 * v + 1], **d).cpu(),
        "factors": f.dense().cpu(),
        "n_cases": f.n_cases,
        "factors_mc": K.kronecker_factors(net, X, family, estimator="mc", seed=11, **d).dense().cpu(),
        "gradient": K.loss_gradient(net, X, y, family, **d).cpu(),
        **comparisons(net, X, y, family, d),
        **({"cumulant_" + name: getattr(K.cumulant_terms(net, X, family, 1, 2, **d), name).cpu()
            for name in CUMULANT_TERMS} if family == "categorical" else {}),
    }


CUMULANT_TERMS = ("difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3")
APPROXIMATIONS = ("kfac", "kfac-tridiag", "ekfac", "diagonal")


def comparisons(net, X, y, family, d) -> dict:
    """compare_approximations, dense and matrix-free, as tensors of its numeric columns."""
    out = {}
    for method in ("dense", "matrix-free"):
        df = K.compare_approximations(net, X, family, approximations=APPROXIMATIONS, y=y, gamma=0.1,
                                      method=method, probes=8, top_k=3, **d)
        out["compare_" + method] = torch.tensor(df[["rel_frobenius", "ng_cosine"]].to_numpy(dtype="float64"))
    return out


@pytest.fixture(scope="module")
def distributed_curvature():
    """One launch of two ranks computes everything the comparisons below need."""
    return run_ranks(curvature_on_rank, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_distributed_function_equals_one_process_on_all_cases(family, distributed_curvature):
    assert all(isinstance(r, dict) for r in distributed_curvature), distributed_curvature
    results = [r[family] for r in distributed_curvature]
    net, X, y, v = problem(family)
    one = {
        "exact": K.exact_fisher(net, X, family),
        "empirical": K.empirical_fisher(net, X, y, family),
        "fvp": K.fisher_vector_product(net, X, family, v),
        "gram": K.fisher_gram(net, X, family, [v, 2 * v + 1]),
        "factors": K.kronecker_factors(net, X, family).dense(),
        "gradient": K.loss_gradient(net, X, y, family),
        **comparisons(net, X, y, family, {}),
    }
    if family == "categorical":
        terms = K.cumulant_terms(net, X, family, 1, 2)
        one.update({"cumulant_" + name: getattr(terms, name) for name in CUMULANT_TERMS})
    assert O.rel(one["exact"], O.exact_fisher(net, X, family)) < 1e-10
    n = [SPLIT[1] - SPLIT[0], SPLIT[2] - SPLIT[1]]
    one["mc"] = sum(n[r] * K.mc_fisher(net, shard(X, r), family, samples=3, seed=rank_seed(11, r))
                    for r in range(2)) / sum(n)
    one["factors_mc"] = None  # the MC factors' cross terms are not a weighted mean of per-shard factors' dense()
    for rank, got in enumerate(results):
        assert got["n_cases"] == SPLIT[-1]
        for name, ref in one.items():
            if ref is not None:
                tol = 1e-7 if name == "compare_matrix-free" else 1e-10  # (Lanczos/CG steps amplify rounding)
                assert O.rel(got[name], ref) < tol, (rank, name, O.rel(got[name], ref))
        assert torch.equal(got["exact"], results[0]["exact"])  # every rank holds the same result
    assert O.rel(results[0]["factors_mc"], one["factors"]) > 1e-6  # sampled, so not the exact factors


def failures_on_rank(rank, world_size, device):
    """Two failures in turn, each reported (as text) by every rank: an empty shard on rank 1, then a wrong
    input width on rank 1 only."""
    net, X, _, _ = problem()
    net, X = net.to(device), X.to(device)
    texts = []
    for bad in (X[:0], X[:, :3]):
        try:
            K.kronecker_factors(net, bad if rank == 1 else X, "categorical", distributed=True)
            texts.append("no error")
        except Exception as exc:
            texts.append(f"{type(exc).__name__}: {exc}")
    return texts


@pytest.fixture(scope="module")
def distributed_failures():
    return run_ranks(failures_on_rank, 2, timeout=90)


def test_an_empty_shard_is_an_error_naming_its_rank_on_every_rank(distributed_failures):
    for texts in distributed_failures:
        assert isinstance(texts, list) and "rank(s) [1]" in texts[0] and "no cases" in texts[0], texts


def test_a_rank_that_raises_ends_every_rank_with_a_clear_error(distributed_failures):
    for texts in distributed_failures:
        assert texts[1].startswith("DistributedError") and "rank(s) [1]" in texts[1], texts
        assert "rank 1:" in texts[1] and "3" in texts[1], texts


def test_distributed_argument_is_checked():
    with pytest.raises(ValueError, match="init_process_group"):
        CaseShards(True)
    with pytest.raises(ValueError, match="distributed must be"):
        CaseShards("yes")
    assert not CaseShards(None).active and CaseShards(False).world_size == 1
    assert rank_seed(5, 0) == 5 and rank_seed(5, 1) != rank_seed(6, 0) and rank_seed(5, 1) != rank_seed(5, 2)


KFAC_CONFIG = dict(curvature_estimator="exact", tau1=1.0, tau2=1.0, lambda_init=1.0, T1=2, T2=4, T3=2, seed=0)
STEPS = 10


def kfac_batches():
    """Ten mini-batches of 16 cases; rank 0 takes the first 9 of each, rank 1 the other 7 (uneven)."""
    _, X, y, _ = problem()
    g = torch.Generator().manual_seed(8)
    return [tuple(t[idx] for t in (X, y)) for idx in (torch.randperm(40, generator=g)[:16] for _ in range(STEPS))]


def kfac_on_rank(rank, world_size, device):
    return {inverse: kfac_run(rank, device, inverse) for inverse in ("blockdiag", "tridiag")}


def kfac_run(rank, device, inverse):
    net = O.make_net("d4", seed=3).to(device)
    opt = K.KFAC(net, "categorical", inverse, distributed=True, **KFAC_CONFIG)
    stats = []
    for x, y in kfac_batches():
        rows = slice(0, 9) if rank == 0 else slice(9, 16)
        stats.append(opt.step(x[rows].to(device), y[rows].to(device)))
    return {"theta": O.theta(net).cpu(), "lambda": [s["lambda"] for s in stats],
            "gamma": [s["gamma"] for s in stats], "loss": [s["loss"] for s in stats]}


@pytest.fixture(scope="module")
def distributed_kfac():
    return run_ranks(kfac_on_rank, 2)


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_data_parallel_kfac_equals_one_process_on_the_whole_batch(inverse, distributed_kfac):
    assert all(isinstance(r, dict) for r in distributed_kfac), distributed_kfac
    results = [r[inverse] for r in distributed_kfac]
    net = O.make_net("d4", seed=3)
    theta0 = O.theta(net).clone()
    opt = K.KFAC(net, "categorical", inverse, **KFAC_CONFIG)
    stats = [opt.step(x, y) for x, y in kfac_batches()]
    for got in results:
        assert O.rel(got["theta"], O.theta(net)) < 1e-10
        assert got["lambda"] == pytest.approx([s["lambda"] for s in stats], rel=1e-10)
        assert got["gamma"] == pytest.approx([s["gamma"] for s in stats], rel=1e-10)
        assert got["loss"] == pytest.approx([s["loss"] for s in stats], rel=1e-10)
    assert O.rel(O.theta(net), theta0) > 1e-2  # it trained
    assert len(set(s["lambda"] for s in stats)) > 1  # and λ adapted on the way


def test_torchrun_trains_the_example_network_data_parallel(tmp_path):
    """``torchrun --nproc-per-node 2 -m kfac_lens.cli train example`` trains with data-parallel K-FAC and
    rank 0 alone writes the cached network."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distributed_ranks import free_port

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    env = {**os.environ, "KFAC_LENS_ZOO": str(tmp_path), "OMP_NUM_THREADS": "1", "KFAC_LENS_QUIET": "1"}
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                           "kfac_lens.cli", "train", "example", "--data", "digits", "--retrain"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel K-FAC on 2 processes" in proc.stdout
    assert proc.stdout.count("cached at") == 1  # only rank 0 reports (and writes)
    cached = list(tmp_path.glob("example-digits-quick-*.pt"))
    assert len(cached) == 1
    error = float(proc.stdout.split("final error=")[1].split(")")[0])
    assert error < 0.06  # the recipe stops at its 5% target error (or close to it)
