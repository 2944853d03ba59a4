"""Benchmark ``cnn``: K-FAC against tuned SGD-Nesterov and Adam on notebook 05's small CNN, over 3 seeds.

The network is the notebook's ``SmallCNN`` (two strided 3×3 convolutions with tanh, 2×2 average pooling,
a tanh layer with a skip connection, a softmax output) on 16×16 MNIST (8×8 digits offline). K-FAC uses the
block-diagonal inverse (Martens & Grosse 2015, Section 3.2) with KFC factors for the convolutions (Grosse &
Martens 2016), read through ``example_input`` as the drop-in optimizer does. Each method gets the same
budget of **optimizer CPU time** per seed: every run uses one torch thread and is timed with
:func:`time.process_time` (the process's CPU time, which another job on a shared machine does not inflate),
evaluation and mini-batch sampling excluded. Every hyper-parameter that is tuned — the learning rates,
K-FAC's initial λ (Appendix E.5), the batch sizes and K-FAC's inverse refresh period T₃ (Appendix G) — is
picked on a grid, one after the other, by :func:`~kfac_lens.bench.optimizer.tune_on_grid`, which widens a
grid whose best lies at an edge. The table gives, per method, the median and min–max over the seeds of the
training and test error at fixed times and the time to reach SGD-Nesterov's median final training error.
Run it as ``kfac-lens bench cnn``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .harness import Benchmark, format_table, load_average, resolve_device, torch_threads
from .optimizer import GridSearch, Spread, summarize, summarize_runs, tune_on_grid

DEFAULT_SEEDS = (0, 1, 2)
METHODS = ("K-FAC", "SGD-Nesterov", "Adam")


class SmallCNN(nn.Module):
    """Notebook 05's network: conv(1→4, 3×3, stride 2) – tanh – conv(4→8) – tanh – 2×2 average pool –
    fc1(32→32) with the skip tanh(fc1(h)) + h – fc2(32→10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        h = self.pool(x).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)) + h)


@dataclass(frozen=True)
class Tuning:
    """The grids of one method, searched in order (each with the best values found before it):
    ``(keyword, starting grid, integer?)``, and the fixed keywords ``fixed``."""

    grids: tuple[tuple[str, tuple[float, ...], bool], ...]
    fixed: dict = field(default_factory=dict)


#: The starting grids, ascending; a grid whose best is at an edge is widened (``tune_on_grid``).
TUNINGS: dict[str, Tuning] = {
    "K-FAC": Tuning((("lambda_init", (0.03, 0.1, 0.3, 1.0), False), ("batch", (512, 1024, 2048, 4096), True),
                     ("T3", (10, 20, 40), True))),
    "SGD-Nesterov": Tuning((("lr", (0.05, 0.1, 0.2, 0.4), False), ("batch", (128, 256, 512), True)),
                           {"momentum": 0.9}),
    "Adam": Tuning((("lr", (1e-3, 3e-3, 1e-2), False), ("batch", (64, 128, 256), True))),
}
#: The values before tuning: the notebook's batch of 256 (K-FAC: 1024, from a pilot run) and T₃ = 20.
START = {"K-FAC": {"batch": 1024, "T3": 20}, "SGD-Nesterov": {"batch": 256}, "Adam": {"batch": 256}}


@dataclass
class Problem:
    """Training images (N, 1, s, s) and labels, the training cases the error is measured on, the test set."""

    X: torch.Tensor
    y: torch.Tensor
    X_eval: torch.Tensor
    y_eval: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str


def load_problem(data: str = "mnist16", eval_cases: int | None = None, device="cpu") -> Problem:
    """``data`` ("mnist16" or "digits") as images; the training error is measured on the first
    ``eval_cases`` training cases (default all)."""
    from ..data import load_dataset
    if data not in ("mnist16", "digits"):
        raise ValueError(f"data must be 'mnist16' or 'digits', got {data!r}.")
    tr, te = load_dataset(data, "train"), load_dataset(data, "test")
    side = tr.image_shape[0]

    def img(ds):
        return ds.X.reshape(-1, 1, side, side).to(device), ds.y.to(device)

    X, y = img(tr)
    Xt, yt = img(te)
    k = X.shape[0] if eval_cases is None else min(int(eval_cases), X.shape[0])
    return Problem(X, y, X[:k], y[:k], Xt, yt, tr.name)


def make_optimizer(method: str, model: nn.Module, example: torch.Tensor, seed: int, **hp):
    """The optimizer of ``method`` for ``model``: K-FAC (block-diagonal; T₂ = T₃ so that the γ search of
    Appendix E.6 runs at every refresh), SGD-Nesterov or Adam, with the keywords ``hp`` (``batch`` dropped)."""
    from ..optim import KFAC, Adam, SGDNesterov
    hp = {k: v for k, v in hp.items() if k != "batch"}
    if method == "K-FAC":
        if "T3" in hp:
            hp["T3"] = hp["T2"] = int(hp["T3"])
        return KFAC(model, nn.CrossEntropyLoss(), "blockdiag", example_input=example, seed=seed, **hp)
    if method == "SGD-Nesterov":
        return SGDNesterov(model, "categorical", example_input=example, **hp)
    if method == "Adam":
        return Adam(model, "categorical", example_input=example, **hp)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")


@torch.no_grad()
def _error(model, X, y, chunk: int = 10000) -> float:
    wrong = sum(int((model(X[s:s + chunk]).argmax(1) != y[s:s + chunk]).sum()) for s in range(0, len(X), chunk))
    return wrong / len(X)


def run_for(method: str, problem: Problem, seconds: float, seed: int, hp: dict, evals: int = 20,
            test: bool = True) -> pd.DataFrame:
    """Train a fresh ``SmallCNN`` (initialised from ``seed``) with ``method`` for ``seconds`` of optimizer CPU
    time (:func:`time.process_time` around each step; mini-batches of ``hp["batch"]`` drawn with replacement
    from a generator seeded by ``seed``). The training (and test) error is recorded at k·seconds/``evals``
    for k = 0…evals (at the first step past each). Returns the history: time, iteration, train/test error."""
    if not seconds > 0 or evals < 1:
        raise ValueError(f"seconds must be positive and evals ≥ 1, got {seconds}, {evals}.")
    torch.manual_seed(seed)
    model = SmallCNN().to(problem.X.device)
    opt = make_optimizer(method, model, problem.X[:2], seed, **hp)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, m = problem.X.shape[0], int(hp["batch"])
    rows, elapsed, it, next_k = [], 0.0, 0, 0

    def record():
        rows.append({"time": elapsed, "iteration": it, "train error": _error(model, problem.X_eval, problem.y_eval),
                     "test error": _error(model, problem.X_test, problem.y_test) if test else math.nan})

    while True:
        if elapsed >= next_k * seconds / evals:
            record()
            next_k = math.floor(elapsed * evals / seconds) + 1
            if elapsed >= seconds:
                return pd.DataFrame(rows)
        idx = torch.randint(0, n, (m,), generator=gen).to(problem.X.device)
        x, y = problem.X[idx], problem.y[idx]
        t0 = time.process_time()
        opt.step(x, y)
        elapsed += time.process_time() - t0
        it += 1


def _at(h: pd.DataFrame, t: float, col: str) -> float:
    """The reading at time t: the first one at or past t (as :func:`run_for` records them)."""
    ev = h[h["time"] >= t * (1 - 1e-9)]
    return float(ev[col].iloc[0]) if len(ev) else math.nan


def _time_to(h: pd.DataFrame, target: float) -> float:
    hit = h[h["train error"] <= target]
    return float(hit["time"].iloc[0]) if len(hit) else math.inf


def _late_error(h: pd.DataFrame) -> float:
    return float(h["train error"].iloc[-3:].mean())  # evals=4: the readings at 1/2, 3/4 and all of the time


def tune_method(method: str, problem: Problem, seconds: float, seeds: Sequence[int], max_extensions: int = 2,
                tuning: Tuning | None = None, log: list | None = None) -> tuple[dict, dict[str, GridSearch]]:
    """Tune ``method``'s grids one after the other (:class:`Tuning`). A value's score is the median over
    ``seeds`` of the training error averaged over the times ``seconds``·(1/2, 3/4, 1) (the late error: less
    noisy than the last reading alone). Returns the best keywords and the searches."""
    tuning = tuning or TUNINGS[method]
    hp = {**START[method], **tuning.fixed}
    searches = {}
    for key, grid, integer in tuning.grids:
        def score(v, key=key, integer=integer):
            trial = {**hp, key: int(round(v)) if integer else v}
            errs = [_late_error(run_for(method, problem, seconds, s, trial, evals=4, test=False)) for s in seeds]
            e = summarize(errs).median
            if log is not None:
                log.append({"method": method, "keyword": key, "value": v, "error": e})
            return e
        searches[key] = tune_on_grid(score, grid, max_extensions)
        hp[key] = int(round(searches[key].best)) if integer else searches[key].best
    return hp, searches


def held_out_seeds(seeds: Sequence[int], count: int = 2) -> list[int]:
    """``count`` tuning seeds disjoint from the evaluation ``seeds``: the ones after the largest."""
    top = max(int(s) for s in seeds)
    return [top + 1 + i for i in range(count)]


def cnn_benchmark(budget_s: float = 30.0, tune_s: float = 10.0, data: str = "mnist16", device="cpu",
                  seeds: Sequence[int] = DEFAULT_SEEDS, tune_seeds: Sequence[int] | None = None,
                  methods: Sequence[str] = METHODS, eval_cases: int | None = 10000, evals: int = 30,
                  max_extensions: int = 2, tunings: dict[str, Tuning] | None = None,
                  verbose: bool = True) -> pd.DataFrame:
    """Tune each method of ``methods`` (``tune_s`` s per candidate on ``tune_seeds``, default the two seeds
    after the largest of ``seeds``, so that no setting is chosen on a seed it is then evaluated on), then run
    it for ``budget_s`` s of optimizer CPU time once per seed, one torch thread throughout. Returns
    one row per method: medians over the seeds with ``"<column> min"`` / ``"<column> max"`` ranges."""
    seeds = [int(s) for s in seeds]
    methods = list(methods)
    if not seeds:
        raise ValueError("seeds: give at least one seed.")
    if "SGD-Nesterov" not in methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must include 'SGD-Nesterov' (the target) and be among {METHODS}, got {methods}.")
    if not (budget_s > 0 and tune_s > 0):
        raise ValueError(f"budget_s and tune_s must be positive, got {budget_s}, {tune_s}.")
    tune_seeds = held_out_seeds(seeds) if tune_seeds is None else [int(s) for s in tune_seeds]
    tunings = {**TUNINGS, **(tunings or {})}
    dev = resolve_device(device)
    wall0, load_before = time.perf_counter(), load_average()
    with torch_threads(1):
        problem = load_problem(data, eval_cases, dev)
        log: list = []
        tuned = {m: tune_method(m, problem, tune_s, tune_seeds, max_extensions, tunings[m], log) for m in methods}
        hist = {(m, s): run_for(m, problem, budget_s, s, tuned[m][0], evals) for s in seeds for m in methods}
    target = summarize(float(hist["SGD-Nesterov", s]["train error"].iloc[-1]) for s in seeds).median
    checkpoints = (budget_s / 4, budget_s / 2, budget_s)
    cols = [f"{w} error @ {t:g} s" for w in ("train", "test") for t in checkpoints]
    runs = pd.DataFrame([{"method": m, "seed": s, "iterations": int(h["iteration"].iloc[-1]),
                          **{c: _at(h, t, c.split(" @")[0]) for c, t in zip(cols, checkpoints * 2)},
                          "s to SGD's error": _time_to(h, target)} for (m, s), h in hist.items()])
    spread_cols = ["iterations", *cols, "s to SGD's error"]
    df = summarize_runs(runs, spread_cols)
    df.insert(1, "settings", [_settings(tuned[m][0]) for m in df["method"]])
    wall = time.perf_counter() - wall0
    notes = [
        f"problem: notebook 05's SmallCNN on {problem.name} ({problem.X.shape[0]} training cases); train error on "
        f"the first {problem.X_eval.shape[0]} training cases, test error on {problem.X_test.shape[0]} test cases.",
        f"seeds {seeds} (initial weights, mini-batches, K-FAC's sampling): each cell is the median over the seeds "
        "with the [min–max] range.",
        "time = optimizer CPU time: torch.set_num_threads(1) and time.process_time() around each step (the "
        "process's CPU time, robust to other jobs on a shared machine); evaluation and batch sampling excluded; "
        f"error recorded every {budget_s / evals:.3g} s.",
        "K-FAC: block-diagonal inverse, KFC factors for the convolutions, paper defaults otherwise (T1 = 5, "
        "τ1 = 1/8, τ2 = 1/4, momentum, γ₀ = √(λ₀+η)), T2 = T3. SGD-Nesterov: constant momentum 0.9. All: η = 1e-5.",
        f"tuning on seed(s) {tune_seeds}, {tune_s:g} s per candidate, grids in order, each with the best values "
        "before it (late training error: the mean of the readings at 1/2, 3/4 and all of it; an edge best widens the "
        "grid one step, integer values rounded, up to "
        f"{max_extensions}×): " + "; ".join(f"{m} {k} {g.describe()}" for m in methods
                                            for k, g in tuned[m][1].items()),
        "tuning errors: " + "; ".join(f"{r['method']} {r['keyword']}={r['value']:.3g}: {r['error']:.4f}" for r in log),
        f"target = SGD-Nesterov's median final training error {target:.4f}; 's to SGD's error' = optimizer time to "
        f"reach it ('—': not within {budget_s:g} s).",
        "per seed, paired (the same seed's SGD-Nesterov run), the other methods' train error minus SGD-Nesterov's "
        "at " + ", ".join(f"{t:g}" for t in checkpoints) + " s: " + "; ".join(_paired(runs, m, cols[:3], seeds)
                                                                         for m in methods if m != "SGD-Nesterov"),
        f"whole benchmark: {wall / 60:.1f} min wall clock | device={dev} | 1-min load average before/after: "
        f"{_load(load_before)}/{_load(load_average())}",
    ]
    title = f"cnn: K-FAC vs tuned SGD-Nesterov and Adam on notebook 05's CNN, {len(seeds)} seeds, {budget_s:g} s each"
    df.attrs.update(title=title, notes=notes, histories=hist, runs=runs, tuning=pd.DataFrame(log), target=target,
                    searches={m: tuned[m][1] for m in methods}, settings={m: tuned[m][0] for m in methods},
                    seeds=seeds, tune_seeds=tune_seeds, wall_s=wall)
    if verbose:
        print(format_table(display_table(df, spread_cols), title, notes), flush=True)
    return df


def _paired(runs: pd.DataFrame, method: str, cols: Sequence[str], seeds: Sequence[int]) -> str:
    r = runs.set_index(["method", "seed"])
    per_t = []
    for c in cols:
        d = [float(r.loc[(method, s), c] - r.loc[("SGD-Nesterov", s), c]) for s in seeds]
        below = sum(v < 0 for v in d)
        per_t.append("[" + ", ".join(f"{100 * v:+.2f}" for v in d) + f"] pp (below on {below}/{len(d)})")
    return f"{method} " + " | ".join(per_t)


def _settings(hp: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def _load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def display_table(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The table as printed: each column of ``columns`` as "median [min–max]"."""
    out = df[["method", "settings"]].copy()
    for c in columns:
        out[c] = [str(Spread(r[c], r[f"{c} min"], r[f"{c} max"], 0)) for _, r in df.iterrows()]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="optimizer CPU seconds per method and seed (default 30; --quick: 0.4)")
    parser.add_argument("--tune", type=float, default=None, metavar="S",
                        help="seconds per tuning candidate (default 10; --quick: 0.1)")
    parser.add_argument("--data", choices=("mnist16", "digits"), default=None,
                        help="default mnist16 (--quick: digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds of the main runs (default: --seed and the next two)")
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds the grids are scored on (median; default: the two after the largest of "
                             "--seeds, held out from the main runs)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                        help=f"methods to run (default all: {', '.join(METHODS)}; SGD-Nesterov is required)")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    if args.threads not in (None, 1):
        raise ValueError("cnn times optimizer CPU time on one torch thread; --threads must be 1 or left out.")
    return cnn_benchmark(budget_s=args.budget or (0.4 if args.quick else 30.0),
                         tune_s=args.tune or (0.1 if args.quick else 10.0),
                         data=args.data or ("digits" if args.quick else "mnist16"), device=args.device,
                         seeds=args.seeds or [args.seed + i for i in range(len(DEFAULT_SEEDS))],
                         tune_seeds=args.tune_seeds,
                         methods=args.methods or METHODS, evals=8 if args.quick else 30,
                         verbose=not args.no_print)


BENCHMARK = Benchmark("cnn", run_from_args, add_arguments,
                      help="K-FAC vs tuned SGD-Nesterov and Adam on notebook 05's CNN at equal optimizer CPU time, "
                           "medians and ranges over 3 seeds")
