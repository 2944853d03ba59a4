"""Benchmark ``optimizer``: K-FAC (both inverses) against tuned SGD-Nesterov and Adam, over several seeds.

On the quick autoencoder (Section 7; docs/math.md §9; :data:`kfac_lens.zoo.AUTOENCODER_PRESETS`),
each method gets the same optimizer time, once per seed. The baselines' learning rates and K-FAC's
initial λ (Appendix E.5) are picked on grids first; a grid whose best value lies at an edge is widened
by one step beyond that edge and searched again (:func:`tune_on_grid`). The table gives, per method, the
median and the min–max range over the seeds (:func:`summarize`) of the error at fixed times, the time to
reach SGD-Nesterov's median best error, the iterations, and the optimizer time per iteration at a fixed
batch size beside its flops per iteration (:mod:`.flops`), both as ratios to SGD-Nesterov's: the flop ratio is
what the time ratio would be if all of K-FAC's extra work ran at the rate of SGD's own step. Run it as
``kfac-lens bench optimizer``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ..figures.training import extra_progress_per_iteration
from .flops import count_flops
from .harness import Benchmark, format_table, load_average, resolve_device, torch_threads

# The starting grids, ascending; :func:`tune_on_grid` widens one whose best value lies at an edge.
SGD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
KFAC_LAMBDAS = (0.01, 0.1, 1.0, 10.0, 150.0)  # K-FAC's counterpart of a learning rate: the initial λ (Appendix E.5)
DEFAULT_SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------- grids with an interior best
def extend_grid(grid: Sequence[float], side: str) -> tuple[float, ...]:
    """The ascending ``grid`` with one more value beyond its ``side`` ("low" or "high") edge, a step of the
    ratio between the two values at that edge (rounded to two significant digits)."""
    g = sorted(float(v) for v in grid)
    if len(g) < 2 or g[0] <= 0:
        raise ValueError(f"a grid to widen needs at least two positive values, got {list(grid)}.")
    if side == "low":
        return (float(f"{g[0] * g[0] / g[1]:.2g}"), *g)
    if side == "high":
        return (*g, float(f"{g[-1] * g[-1] / g[-2]:.2g}"))
    raise ValueError(f"side must be 'low' or 'high', got {side!r}.")


@dataclass(frozen=True)
class GridSearch:
    """The outcome of :func:`tune_on_grid`: the final (ascending) grid, every value's score, the best value
    (the lowest score; ties go to the smaller value) and how many times the grid was widened."""

    grid: tuple[float, ...]
    scores: dict[float, float]
    best: float
    extensions: int

    @property
    def interior(self) -> bool:
        """Whether the best value has a grid value on each side."""
        return self.grid[0] < self.best < self.grid[-1]

    def describe(self) -> str:
        where = "interior" if self.interior else "STILL AT AN EDGE"
        grown = f", widened {self.extensions}×" if self.extensions else ""
        return f"grid {[float(f'{v:.3g}') for v in self.grid]}{grown}: best {self.best:.3g} ({where})"


def tune_on_grid(score: Callable[[float], float], grid: Sequence[float], max_extensions: int = 2) -> GridSearch:
    """Score every value of ``grid`` (lower is better; NaN counts as +∞); while the best lies at an edge,
    widen the grid one step beyond that edge (:func:`extend_grid`) and score the new value, at most
    ``max_extensions`` times. Values already scored are not scored again."""
    g = tuple(sorted(float(v) for v in grid))
    scores: dict[float, float] = {}
    extensions = 0
    while True:
        for v in g:
            if v not in scores:
                s = float(score(v))
                scores[v] = s if not math.isnan(s) else math.inf
        best = min(g, key=lambda v: (scores[v], v))
        at_edge = best in (g[0], g[-1])
        if not at_edge or extensions >= max_extensions:
            return GridSearch(g, {v: scores[v] for v in g}, best, extensions)
        g = extend_grid(g, "low" if best == g[0] else "high")
        extensions += 1


# ----------------------------------------------------------------------------- statistics over seeds
@dataclass(frozen=True)
class Spread:
    """The median and the min–max range of a few values (NaN ignored; +∞ kept, e.g. "never reached")."""

    median: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        def f(v):
            return "—" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v:.4g}")
        return f(self.median) if self.low == self.high else f"{f(self.median)} [{f(self.low)}–{f(self.high)}]"


def summarize(values: Iterable[float]) -> Spread:
    """:class:`Spread` of ``values``: the median (the mean of the middle two for an even count) and min, max,
    over the values that are not NaN (all NaN: NaN)."""
    v = sorted(float(x) for x in values if not math.isnan(float(x)))
    if not v:
        return Spread(math.nan, math.nan, math.nan, 0)
    n = len(v)
    mid = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    if math.isnan(mid):  # (∞ + −∞)
        mid = math.inf
    return Spread(mid, v[0], v[-1], n)


def summarize_runs(runs: pd.DataFrame, columns: Sequence[str], by: str = "method") -> pd.DataFrame:
    """Per value of ``by`` (in order of first appearance), the median of each column and its range as the
    columns ``"<col> min"`` and ``"<col> max"``."""
    rows = []
    for key, grp in runs.groupby(by, sort=False):
        row = {by: key}
        for c in columns:
            s = summarize(grp[c])
            row[c], row[f"{c} min"], row[f"{c} max"] = s.median, s.low, s.high
        rows.append(row)
    return pd.DataFrame(rows)


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


def _per_iteration_time(make_opt, sizes, X, m, iterations, seed, device) -> float:
    """Mean optimizer time per iteration at a fixed batch size m (refreshes and γ searches included)."""
    from ..optim import train
    model = _make_model(sizes, seed, device)
    h = train(model, make_opt(model), X, X, iterations, batch_size=m, eval_every=10**9, progress=False, seed=seed)
    steady = h[h["iteration"] > 3]  # drop the first iterations (warm-up; K-FAC refreshes on k ≤ 3)
    return float(steady["step_time"].mean())


def _per_iteration_flops(make_opt, sizes, X, m, iterations, seed, device) -> float:
    """Mean flops per iteration (:func:`.flops.count_flops`) over the iterations that
    :func:`_per_iteration_time` times, on the same mini-batches."""
    from ..optim import train
    model = _make_model(sizes, seed, device)
    opt = make_opt(model)
    plain_step, counts = opt.step, []

    def counted_step(x, y):
        if opt.k <= 3:  # (the warm-up iterations that the timing drops)
            return plain_step(x, y)
        flops, out = count_flops(lambda: plain_step(x, y))
        counts.append(flops)
        return out

    opt.step = counted_step
    train(model, opt, X, X, iterations, batch_size=m, eval_every=10**9, progress=False, seed=seed)
    return sum(counts) / len(counts)


def optimizer_benchmark(budget_s: float = 60.0, tune_s: float = 10.0, data: str = "mnist",
                        device: str | torch.device = "cpu", threads: int | None = None,
                        seeds: Sequence[int] = DEFAULT_SEEDS, tune_seeds: Sequence[int] | None = None,
                        max_extensions: int = 4, timing_iterations: int = 43,
                        verbose: bool = True) -> pd.DataFrame:
    """K-FAC (block-diagonal, block-tridiagonal; the paper's defaults and exponential batch schedule) against
    SGD-Nesterov and Adam (fixed batch 500), each run for ``budget_s`` seconds of optimizer time on the quick
    autoencoder once per seed of ``seeds`` (network, data subset, mini-batches and K-FAC's sampling), in one
    process. The learning rates and K-FAC's λ₀ are tuned first (``tune_s`` seconds per candidate, the median
    final error over ``tune_seeds``, default the first seed) by :func:`tune_on_grid`. Returns one row per
    method: medians over the seeds, with ``"<column> min"`` / ``"<column> max"`` for the ranges."""
    from ..optim import KFAC, Adam, SGDNesterov, exponential_batch_sizes
    from .. import zoo
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: give at least one seed.")
    tune_seeds = seeds[:1] if tune_seeds is None else [int(s) for s in tune_seeds]
    dev = resolve_device(device)
    p = zoo.AUTOENCODER_PRESETS["quick"]
    eta = p["eta"]

    load_before = load_average()
    with torch_threads(threads) as n_threads:
        problems = {}
        for s in sorted(set(seeds) | set(tune_seeds)):
            X, sizes = _autoencoder_problem(data, s)
            X = X.to(dev)
            problems[s] = (X, X[: min(2000, X.shape[0])])
        n = problems[seeds[0]][0].shape[0]
        sched = exponential_batch_sizes(min(p["m1"], n), n, p["full_at"])

        def kfac(kind, lam0, seed):
            return lambda m: KFAC(m, "bernoulli", kind, lambda_init=lam0, eta=eta, seed=seed)

        def sgd(lr, seed):
            return lambda m: SGDNesterov(m, "bernoulli", lr=lr, eta=eta)

        def adam(lr, seed):
            return lambda m: Adam(m, "bernoulli", lr=lr, eta=eta)

        def run(make, seconds, bs, ev, seed):
            X, Xeval = problems[seed]
            return _run_for(make, sizes, X, Xeval, seconds, bs, ev, seed, dev)

        # -- tuning: the same budget for every candidate; grids widened until the best is interior
        tuning = []

        def scorer(name, factory, bs, ev):
            def score(v):
                errs = []
                for s in tune_seeds:
                    err = run(factory(v, s), tune_s, bs, ev, s)["error"].dropna()
                    errs.append(float(err.iloc[-1]) if len(err) and math.isfinite(err.iloc[-1]) else math.inf)
                e = summarize(errs).median
                tuning.append({"method": name, "value": v, f"error after {tune_s:g} s": e})
                return e
            return score

        searches = {
            "SGD-Nesterov": tune_on_grid(scorer("SGD-Nesterov", sgd, 500, 25), SGD_LRS, max_extensions),
            "Adam": tune_on_grid(scorer("Adam", adam, 500, 25), ADAM_LRS, max_extensions),
            "K-FAC": tune_on_grid(scorer("K-FAC", lambda v, s: kfac("blockdiag", v, s), sched, 2), KFAC_LAMBDAS,
                                  max_extensions),
        }
        lam0 = searches["K-FAC"].best
        methods = {  # name → (factory of seed, batch size, evaluation period, tuned value)
            "K-FAC block-diagonal": (lambda s: kfac("blockdiag", lam0, s), sched, 2, lam0),
            "K-FAC block-tridiagonal": (lambda s: kfac("tridiag", lam0, s), sched, 2, lam0),
            "SGD-Nesterov": (lambda s: sgd(searches["SGD-Nesterov"].best, s), 500, 25, searches["SGD-Nesterov"].best),
            "Adam": (lambda s: adam(searches["Adam"].best, s), 500, 25, searches["Adam"].best),
        }
        # -- the main runs, every method on every seed, side by side in this process
        hist = {(name, s): run(factory(s), budget_s, bs, ev, s)
                for s in seeds for name, (factory, bs, ev, _) in methods.items()}
        # -- per-iteration time at a fixed m = 1000, per seed
        m_fixed = min(1000, n)
        per_it = {(name, s): _per_iteration_time(factory(s), sizes, problems[s][0], m_fixed, timing_iterations, s,
                                                 dev)
                  for s in seeds for name, (factory, _, _, _) in methods.items()}
        flops = {(name, s): _per_iteration_flops(factory(s), sizes, problems[s][0], m_fixed, timing_iterations, s,
                                                 dev)
                 for s in seeds for name, (factory, _, _, _) in methods.items()}

    sgd_bests = [float(hist["SGD-Nesterov", s]["error"].dropna().min()) for s in seeds]
    sgd_best = summarize(sgd_bests).median  # the target: SGD-Nesterov's median best error
    checkpoints = (budget_s / 4, budget_s / 2, budget_s)
    err_cols = [f"error @ {t:g} s" for t in checkpoints]
    it_col = f"s/iter @ m={m_fixed}"
    runs = []
    for (name, s), h in hist.items():
        t_hit = _time_to(h, sgd_best)
        runs.append({"method": name, "seed": s, "iterations": int(h["iteration"].max()),
                     **{c: _error_at(h, t) for c, t in zip(err_cols, checkpoints)},
                     "s to SGD's best": t_hit if math.isfinite(t_hit) else math.inf,  # ∞: never reached
                     it_col: per_it[name, s], "iter-time ratio to SGD": per_it[name, s] / per_it["SGD-Nesterov", s],
                     "flop ratio to SGD": flops[name, s] / flops["SGD-Nesterov", s]})
    runs = pd.DataFrame(runs)
    spread_cols = ["iterations", *err_cols, "s to SGD's best", it_col, "iter-time ratio to SGD", "flop ratio to SGD"]
    df = summarize_runs(runs, spread_cols)
    df.insert(1, "lr / λ₀", [methods[name][3] for name in df["method"]])
    t_sgd = float(df.set_index("method").loc["SGD-Nesterov", "s to SGD's best"])
    ratio = [t / t_sgd if math.isfinite(t) and t_sgd > 0 else math.nan for t in df["s to SGD's best"]]
    df.insert(df.columns.get_loc("s to SGD's best min"), "ratio to SGD's time", ratio)
    # -- progress per iteration, tridiagonal vs block-diagonal, per seed
    progress = []
    for s in seeds:
        progress.append(extra_progress_per_iteration(hist["K-FAC block-diagonal", s],
                                                     hist["K-FAC block-tridiagonal", s]))
    prog = summarize(progress)

    names = {"SGD-Nesterov": "SGD-Nesterov lr", "Adam": "Adam lr", "K-FAC": "K-FAC λ₀ (block-diagonal)"}
    notes = [
        f"problem: quick autoencoder {'-'.join(map(str, sizes))} (Bernoulli loss, η = {eta:g}) on {n} {data} "
        f"cases; error = squared reconstruction error per case on the first {problems[seeds[0]][1].shape[0]} "
        "training cases.",
        f"seeds {seeds} (network, data subset, mini-batches and K-FAC's sampling): each cell is the median over "
        "the seeds with the [min–max] range; one value where all seeds agree.",
        f"K-FAC: paper defaults (T1 = 5, T2 = T3 = 20, τ1 = 1/8, τ2 = 1/4, momentum) but λ₀ tuned (150 is the "
        f"paper's); exponential batch schedule m₁ = {p['m1']} reaching {n} at k = {p['full_at']}. Baselines: batch "
        "500, learning rate tuned.",
        f"tuning on seed(s) {tune_seeds}, {tune_s:g} s per candidate (median final error; a grid whose best is at "
        f"an edge is widened one step beyond it, up to {max_extensions}×): " + "; ".join(
            f"{names[k]} {v.describe()}" for k, v in searches.items()),
        "tuning errors: " + "; ".join(
            f"{r['method']} {r['value']:.3g}: {r[f'error after {tune_s:g} s']:.4g}" for r in tuning),
        f"SGD-Nesterov's best error per seed {[float(f'{b:.4g}') for b in sgd_bests]}, median {sgd_best:.4g} = the "
        f"target; 's to SGD's best' = optimizer time to reach it ('—': never, in {budget_s:g} s); 'ratio to SGD's "
        "time' = the ratio of the medians (target for K-FAC ≤ 0.25).",
        f"s/iter: mean optimizer time per iteration over {timing_iterations - 3} iterations at fixed m = {m_fixed} "
        "(after 3 warm-up iterations), inverse refreshes and γ searches included; 'iter-time ratio to SGD' per "
        "seed, against that seed's SGD run (target for K-FAC ≤ 2×).",
        f"flop ratio: flops per iteration over the same iterations and mini-batches (matrix products by torch's "
        f"FlopCounterMode, Cholesky, its inverse, triangular solves and eigh by textbook counts; element-wise "
        f"work not counted), against SGD-Nesterov's ({flops['SGD-Nesterov', seeds[0]] / 1e9:.3g} GFLOP): the "
        "iter-time ratio K-FAC would have if all its extra work ran at SGD's flop rate, the bound that faster "
        "code alone cannot beat.",
        "progress per iteration: to reach block-diagonal's error at the last iteration both runs made, "
        "block-diagonal needs this many times more iterations than block-tridiagonal, minus 1: "
        f"{_percent(prog)} (per seed {', '.join(f'{100 * v:+.0f}%' for v in progress)}; the paper saw +25% "
        "to +40%).",
        f"time is optimizer wall-clock (evaluation excluded) | device={dev} | torch threads={n_threads} | "
        f"1-min load average before/after: {_load(load_before)}/{_load(load_average())}",
    ]
    title = f"optimizer: K-FAC vs tuned SGD-Nesterov and Adam on the quick autoencoder, {len(seeds)} seeds"
    df.attrs.update(title=title, notes=notes, histories=hist, tuning=pd.DataFrame(tuning), runs=runs,
                    searches=searches, tridiag_progress=prog.median, sgd_best=sgd_best, seeds=seeds)
    if verbose:
        print(format_table(display_table(df, spread_cols), title, notes), flush=True)
    return df


def _load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _percent(s: Spread) -> str:
    return f"{100 * s.median:+.0f}% [{100 * s.low:+.0f}% to {100 * s.high:+.0f}%]"


def display_table(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The table as printed: each column of ``columns`` as "median [min–max]" (from its min/max columns)."""
    out = df[["method", "lr / λ₀"]].copy()
    out["lr / λ₀"] = [f"{v:.3g}" for v in df["lr / λ₀"]]
    for c in columns:
        out[c] = [str(Spread(r[c], r[f"{c} min"], r[f"{c} max"], 0)) for _, r in df.iterrows()]
        if c == "s to SGD's best":
            out["ratio to SGD's time"] = [f"{v:.3g}" for v in df["ratio to SGD's time"]]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="optimizer seconds per method and seed in the main runs (default 60; --quick: 1.5)")
    parser.add_argument("--tune", type=float, default=None, metavar="S",
                        help="seconds per learning-rate candidate (default 10; --quick: 0.3)")
    parser.add_argument("--data", choices=("mnist", "digits"), default=None,
                        help="default mnist (--quick: digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds of the main runs (default: --seed and the next two, 0 1 2); the grids are "
                             "tuned on the first")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    budget = args.budget or (1.5 if args.quick else 60.0)
    tune = args.tune or (0.3 if args.quick else 10.0)
    data = args.data or ("digits" if args.quick else "mnist")
    seeds = args.seeds or [args.seed + i for i in range(len(DEFAULT_SEEDS))]
    return optimizer_benchmark(budget_s=budget, tune_s=tune, data=data, device=args.device, threads=args.threads,
                               seeds=seeds, timing_iterations=13 if args.quick else 43, verbose=not args.no_print)


BENCHMARK = Benchmark("optimizer", run_from_args, add_arguments,
                      help="K-FAC (both inverses) vs tuned SGD-Nesterov and Adam on the quick autoencoder, "
                           "medians and ranges over 3 seeds")
