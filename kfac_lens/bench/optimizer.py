"""Benchmark ``optimizer``: K-FAC (both inverses) against tuned SGD-Nesterov and Adam, in one process.

On the quick autoencoder (Section 7; docs/math.md §9; :data:`kfac_lens.zoo.AUTOENCODER_PRESETS`),
each method gets the same optimizer time. The baselines' learning rates and K-FAC's initial λ
(Appendix E.5) are picked on small grids first. The table gives the error at fixed times, the time
to reach SGD-Nesterov's best error, and the optimizer time per iteration at a fixed batch size. Run
it as ``kfac-lens bench optimizer``.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

from .harness import Benchmark, format_table, resolve_device, torch_threads

SGD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
KFAC_LAMBDAS = (150.0, 10.0, 1.0)  # K-FAC's counterpart of a learning rate: the initial λ (Appendix E.5)


def _autoencoder_problem(data: str, seed: int):
    from .. import zoo
    ds = zoo.autoencoder_data("quick", data, seed)
    sizes = zoo.AUTOENCODER_PRESETS["quick"]["sizes"] if data == "mnist" else [64, 48, 24, 8, 24, 48, 64]
    return ds.X, sizes


def _make_model(sizes, seed, device):
    from .. import zoo
    return zoo.sparse_init_(zoo.autoencoder_net(sizes), seed=seed).to(device)


def _run_for(make_opt, sizes, X, Xeval, seconds, batch, eval_every, seed, device) -> pd.DataFrame:
    from ..optim import train
    model = _make_model(sizes, seed, device)
    return train(model, make_opt(model), X, X, 10**7, batch_size=batch, eval_X=Xeval, eval_y=Xeval,
                 eval_every=eval_every, progress=False, seed=seed, time_limit=seconds)


def _error_at(h: pd.DataFrame, t: float) -> float:
    ev = h.dropna(subset=["error"])
    ev = ev[ev["time"] <= t]
    return float(ev["error"].iloc[-1]) if len(ev) else float("nan")


def _time_to(h: pd.DataFrame, target: float) -> float:
    ev = h.dropna(subset=["error"])
    hit = ev[ev["error"] <= target]
    return float(hit["time"].iloc[0]) if len(hit) else float("nan")


def _iterations_to(h: pd.DataFrame, target: float) -> float:
    ev = h.dropna(subset=["error"])
    hit = ev[ev["error"] <= target]
    return float(hit["iteration"].iloc[0]) if len(hit) else float("nan")


def _per_iteration_time(make_opt, sizes, X, m, iterations, seed, device) -> float:
    """Mean optimizer time per iteration at a fixed batch size m (refreshes and γ searches included)."""
    from ..optim import train
    model = _make_model(sizes, seed, device)
    h = train(model, make_opt(model), X, X, iterations, batch_size=m, eval_every=10**9, progress=False, seed=seed)
    steady = h[h["iteration"] > 3]  # drop the first iterations (warm-up; K-FAC refreshes on k ≤ 3)
    return float(steady["step_time"].mean())


def optimizer_benchmark(budget_s: float = 60.0, tune_s: float = 10.0, data: str = "mnist",
                        device: str | torch.device = "cpu", threads: int | None = None, seed: int = 0,
                        verbose: bool = True) -> pd.DataFrame:
    """K-FAC (block-diagonal, block-tridiagonal; the paper's defaults and exponential batch schedule) against
    SGD-Nesterov and Adam (fixed batch 500, learning rate tuned on a grid for ``tune_s`` seconds each), each
    run for ``budget_s`` seconds of optimizer time on the quick autoencoder, in one process."""
    from ..optim import KFAC, Adam, SGDNesterov, exponential_batch_sizes
    from .. import zoo
    dev = resolve_device(device)
    p = zoo.AUTOENCODER_PRESETS["quick"]
    with torch_threads(threads) as n_threads:
        X, sizes = _autoencoder_problem(data, seed)
        X = X.to(dev)
        Xeval = X[: min(2000, X.shape[0])]
        n = X.shape[0]
        sched = exponential_batch_sizes(min(p["m1"], n), n, p["full_at"])
        eta = p["eta"]

        def kfac(kind, lam0):
            return lambda m: KFAC(m, "bernoulli", kind, lambda_init=lam0, eta=eta, seed=seed)

        # -- tuning: the baselines' learning rates and K-FAC's λ₀, the same budget for every candidate
        tuning = []
        best = {}
        grids = (("SGD-Nesterov", lambda v: (lambda m: SGDNesterov(m, "bernoulli", lr=v, eta=eta)), SGD_LRS, 500, 25),
                 ("Adam", lambda v: (lambda m: Adam(m, "bernoulli", lr=v, eta=eta)), ADAM_LRS, 500, 25),
                 ("K-FAC", lambda v: kfac("blockdiag", v), KFAC_LAMBDAS, sched, 2))
        for name, make, grid, bs, ev in grids:
            scores = {}
            for v in grid:
                h = _run_for(make(v), sizes, X, Xeval, tune_s, bs, ev, seed, dev)
                err = h["error"].dropna()
                scores[v] = float(err.iloc[-1]) if len(err) and math.isfinite(err.iloc[-1]) else float("inf")
                tuning.append({"method": name, "value": v, f"error after {tune_s:g} s": scores[v]})
            best[name] = min(scores, key=scores.get)
        lam0 = best.pop("K-FAC")
        # -- the main runs, side by side in this process
        methods = {
            "K-FAC block-diagonal": (kfac("blockdiag", lam0), sched, 2),
            "K-FAC block-tridiagonal": (kfac("tridiag", lam0), sched, 2),
            "SGD-Nesterov": (lambda m: SGDNesterov(m, "bernoulli", lr=best["SGD-Nesterov"], eta=eta), 500, 25),
            "Adam": (lambda m: Adam(m, "bernoulli", lr=best["Adam"], eta=eta), 500, 25),
        }
        hist = {name: _run_for(make, sizes, X, Xeval, budget_s, bs, ev, seed, dev)
                for name, (make, bs, ev) in methods.items()}
        sgd_best = float(hist["SGD-Nesterov"]["error"].dropna().min())
        t_sgd = _time_to(hist["SGD-Nesterov"], sgd_best)
        # -- per-iteration time at m = 1000
        m_fixed = min(1000, n)
        per_it = {name: _per_iteration_time(make, sizes, X, m_fixed, 43, seed, dev)
                  for name, (make, _, _) in methods.items()}
        # -- progress per iteration, tridiagonal vs block-diagonal
        hb, ht = hist["K-FAC block-diagonal"], hist["K-FAC block-tridiagonal"]
        k_common = int(min(hb["iteration"].max(), ht["iteration"].max()))
        target = float(hb[hb["iteration"] <= k_common]["error"].dropna().iloc[-1])
        it_b, it_t = _iterations_to(hb, target), _iterations_to(ht, target)

    rows = []
    for name, h in hist.items():
        t_hit = _time_to(h, sgd_best)
        rows.append({
            "method": name,
            "lr / λ₀": best.get(name, lam0 if name.startswith("K-FAC") else float("nan")),
            "iterations": int(h["iteration"].max()),
            f"error @ {budget_s / 4:g} s": _error_at(h, budget_s / 4),
            f"error @ {budget_s / 2:g} s": _error_at(h, budget_s / 2),
            f"error @ {budget_s:g} s": _error_at(h, budget_s),
            "s to SGD's best": t_hit,
            "ratio to SGD's time": t_hit / t_sgd if math.isfinite(t_hit) else float("nan"),
            f"s/iter @ m={m_fixed}": per_it[name],
            "iter-time ratio to SGD": per_it[name] / per_it["SGD-Nesterov"],
        })
    df = pd.DataFrame(rows)
    progress = (it_b / it_t - 1.0) if (math.isfinite(it_b) and math.isfinite(it_t) and it_t > 0) else float("nan")
    notes = [
        f"problem: quick autoencoder {'-'.join(map(str, sizes))} (Bernoulli loss, η = {eta:g}) on {n} {data} "
        f"cases; error = squared reconstruction error per case on the first {Xeval.shape[0]} training cases.",
        f"K-FAC: paper defaults (T1 = 5, T2 = T3 = 20, τ1 = 1/8, τ2 = 1/4, momentum) but λ₀ picked on the grid "
        f"{list(KFAC_LAMBDAS)} (150 is the paper's); exponential batch schedule m₁ = {p['m1']} reaching {n} at "
        f"k = {p['full_at']}. Baselines: batch 500, learning rate picked on the grids below.",
        f"tuning ({tune_s:g} s each; K-FAC's λ₀ with the block-diagonal inverse): " + "; ".join(
            f"{r['method']} {'λ₀' if r['method'] == 'K-FAC' else 'lr'}={r['value']:g}: "
            f"{r[f'error after {tune_s:g} s']:.4g}" for r in tuning),
        f"SGD-Nesterov's best error {sgd_best:.4g} was reached at {t_sgd:.1f} s; 'ratio to SGD's time' = "
        "(s to SGD's best) / that time (target for K-FAC ≤ 1/3).",
        f"s/iter: mean optimizer time per iteration over 40 iterations at fixed m = {m_fixed} (after 3 warm-up "
        "iterations), inverse refreshes and γ searches included (target for K-FAC ≤ 2× SGD).",
        f"progress per iteration: block-diagonal reached error {target:.4g} at iteration {it_b:g}, "
        f"block-tridiagonal at {it_t:g}: tridiagonal makes {100 * progress:+.0f}% more progress per iteration "
        "(the paper saw +25% to +40%).",
        f"time is optimizer wall-clock (evaluation excluded) | device={dev} | torch threads={n_threads}",
    ]
    title = "optimizer: K-FAC vs tuned SGD-Nesterov and Adam on the quick autoencoder"
    df.attrs.update(title=title, notes=notes, histories=hist, tuning=pd.DataFrame(tuning),
                    tridiag_progress=progress, sgd_best=sgd_best)
    if verbose:
        print(format_table(df, title, notes), flush=True)
    return df


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="optimizer seconds per method in the main runs (default 60; --quick: 4)")
    parser.add_argument("--tune", type=float, default=None, metavar="S",
                        help="seconds per learning-rate candidate (default 10; --quick: 1)")
    parser.add_argument("--data", choices=("mnist", "digits"), default=None,
                        help="default mnist (--quick: digits)")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    budget = args.budget or (4.0 if args.quick else 60.0)
    tune = args.tune or (1.0 if args.quick else 10.0)
    data = args.data or ("digits" if args.quick else "mnist")
    return optimizer_benchmark(budget_s=budget, tune_s=tune, data=data, device=args.device, threads=args.threads,
                               seed=args.seed, verbose=not args.no_print)


BENCHMARK = Benchmark("optimizer", run_from_args, add_arguments,
                      help="K-FAC (both inverses) vs tuned SGD-Nesterov and Adam on the quick autoencoder, one process")
