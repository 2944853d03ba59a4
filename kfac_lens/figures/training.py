"""Training curves: loss and error against iterations, training cases processed and time (Section 13).

:func:`draw_training_curves` draws the histories that :func:`kfac_lens.optim.train` records on a
Figure; :func:`figure_training_curves` makes the CLI's figure from them. A history with a ``seed``
column holding several seeds is drawn as the median over the seeds with a min–max band
(:func:`seed_band`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from .panels import DrawnFigure

__all__ = [
    "TRAINING_ERROR_DEFINITIONS",
    "TRAINING_LOSS_DEFINITION",
    "TrainingLabels",
    "draw_training_curves",
    "extra_progress_per_iteration",
    "figure_training_curves",
    "seed_band",
    "training_comparison_labels",
]

TRAINING_ERROR_DEFINITIONS = {
    # what kfac_lens.optim.train's `evaluate` records as "error" for each likelihood
    "bernoulli": ("squared reconstruction error per case", r"$\sum_i (\sigma(z_i) - y_i)^2$, mean over cases"),
    "gaussian": ("squared error per case", r"$\sum_i (z_i - y_i)^2$, mean over cases"),
    "categorical": ("classification error rate", "fraction of cases with argmax z ≠ y"),
}
TRAINING_LOSS_DEFINITION = "mean negative log-likelihood per case on the iteration's mini-batch, before the update"


def training_layout(histories: Mapping[str, pd.DataFrame]) -> tuple[bool, list[tuple[str, str]]]:
    """Whether the histories hold an error row, and the x axes (column, label) of the curves."""
    has_error = any("error" in h.columns and h["error"].notna().any() for h in histories.values())
    xaxes = [("iteration", "iteration")]
    if any("batch_size" in h.columns for h in histories.values()):
        xaxes.append(("cases_processed", "training cases processed\n(cumulative mini-batch sizes)"))
    xaxes.append(("time", "optimizer time (s)"))
    return has_error, xaxes


@dataclass(frozen=True)
class TrainingLabels:
    """What the training figure names: its first title line (``title``, else built from ``network``,
    ``data`` and ``preset``) and the ``likelihood`` whose error the histories record."""

    title: str | None = None
    network: str | None = None
    data: str | None = None
    preset: str | None = None
    likelihood: str | None = None
    note: str | None = None

    def head(self) -> str:
        if self.title is not None:
            return self.title
        what = ", ".join(x for x in (
            self.network,
            f"{self.data} training set" if self.data else None,
            f"preset {self.preset!r}" if self.preset else None,
        ) if x)
        return "Training curves" + (f": {what}" if what else "") + (f"\n{self.note}" if self.note else "")


def draw_training_curves(fig: Figure, histories: Mapping[str, pd.DataFrame],
                         labels: TrainingLabels = TrainingLabels()) -> pd.DataFrame:
    """Draw the curves of :func:`figure_training_curves` on ``fig``; returns the stacked histories."""
    if not histories:
        raise ValueError("figure_training_curves needs at least one history DataFrame.")
    for name, h in histories.items():
        missing = {"iteration", "time", "loss"} - set(h.columns)
        if missing:
            raise ValueError(
                f"history {name!r} lacks column(s) {sorted(missing)}; "
                "need iteration, time (seconds), loss and optionally error and batch_size."
            )
    histories = {name: _with_cases_processed(h) for name, h in histories.items()}
    has_error, xaxes = training_layout(histories)
    n_rows, n_cols = (2 if has_error else 1), len(xaxes)
    err_short, err_formula = error_definition(labels.likelihood)
    ylabels = {
        "loss": "training loss\n(mini-batch NLL per case)",
        "error": f"training-set error\n({err_short})",
    }
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, col in enumerate(["loss", "error"][:n_rows]):
        for c, (xcol, xlabel) in enumerate(xaxes):
            ax = axes[r, c]
            for name, h in histories.items():
                if col in h.columns and xcol in h.columns:
                    band = seed_band(h, xcol, col, log_x=xcol == "iteration") if _n_seeds(h) > 1 else None
                    if band is not None:
                        x, med, lo, hi = band
                        line, = ax.plot(x, med, label=f"{name} (median, min–max of {_n_seeds(h)} seeds)", lw=1.3)
                        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
                        continue
                    vals = h[col].astype(float)
                    ok = vals > 0
                    ax.plot(h[xcol][ok], vals[ok], label=str(name), lw=1.3)
            ax.set_yscale("log")
            if xcol == "iteration":
                ax.set_xscale("log")  # first-order methods take many more (cheaper) iterations
            elif xcol == "cases_processed":
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M: no offset text on the label
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabels[col])
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    lines = [labels.head(), f"loss: {TRAINING_LOSS_DEFINITION}"]
    if has_error:
        lines.append(f"error: {err_short}" + (f" = {err_formula}" if err_formula else "")
                     + ", on the whole training set every few iterations")
    fig.suptitle("\n".join(lines), fontsize=10)
    return pd.concat([h.assign(run=name) for name, h in histories.items()], ignore_index=True)


def _n_seeds(h: pd.DataFrame) -> int:
    return int(h["seed"].nunique()) if "seed" in h.columns else 1


def _with_cases_processed(h: pd.DataFrame) -> pd.DataFrame:
    """``cases_processed``: the cumulative sum of ``batch_size`` (per seed where there is a ``seed`` column)."""
    if "batch_size" not in h.columns:
        return h
    bs = h["batch_size"].astype(float)
    return h.assign(cases_processed=bs.groupby(h["seed"]).cumsum() if "seed" in h.columns else bs.cumsum())


def seed_band(h: pd.DataFrame, xcol: str, ycol: str, *, log_x: bool = False, points: int = 200):
    """The median and the min–max range over the seeds of ``h`` (a history with a ``seed`` column) of the
    positive values of ``ycol`` against ``xcol``: each seed's curve interpolated (in log y; in log x when
    ``log_x``) onto ``points`` values of x over the range every seed covers. Returns (x, median, low, high)
    arrays, or None when the seeds' ranges of x do not overlap."""
    curves = []
    for _, g in h.groupby("seed", sort=True):
        g = g[[xcol, ycol]].astype(float).dropna()
        g = g[g[ycol] > 0].sort_values(xcol).drop_duplicates(xcol, keep="last")
        if len(g) == 0:
            continue
        curves.append((g[xcol].to_numpy(), np.log(g[ycol].to_numpy())))
    if not curves:
        return None
    start, stop = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if not start <= stop:
        return None
    geometric = log_x and start > 0
    x = np.geomspace(start, stop, points) if geometric and stop > start else np.linspace(start, stop, points)
    if geometric:
        ys = np.stack([np.interp(np.log(x), np.log(cx), cy) for cx, cy in curves])
    else:
        ys = np.stack([np.interp(x, cx, cy) for cx, cy in curves])
    return x, np.exp(np.median(ys, axis=0)), np.exp(ys.min(axis=0)), np.exp(ys.max(axis=0))


def extra_progress_per_iteration(reference: pd.DataFrame, other: pd.DataFrame) -> float:
    """How much more progress per iteration ``other`` makes than ``reference`` (Section 13 compares the
    block-tridiagonal inverse with the block-diagonal one this way): to reach the error ``reference`` has at
    the last iteration both runs made, ``reference`` needs this many times more iterations than ``other``,
    minus 1 (+0.25: 25% more progress). Each run reaches the target where its recorded errors (every few
    iterations) first fall to it, interpolated linearly in log error between the two records around that
    point; NaN when either run never records an error at or below the target."""
    if "error" not in reference.columns or "error" not in other.columns:
        return float("nan")
    last = int(min(reference["iteration"].max(), other["iteration"].max()))
    seen = reference[reference["iteration"] <= last]["error"].dropna()
    if not len(seen):
        return float("nan")
    target = float(seen.iloc[-1])

    def first_at(h: pd.DataFrame) -> float:
        rec = h.dropna(subset=["error"])
        k, e = rec["iteration"].to_numpy(float), rec["error"].to_numpy(float)
        below = np.flatnonzero(e <= target)
        if not len(below):
            return float("nan")
        i = int(below[0])
        if i == 0 or not (e[i] > 0 and e[i - 1] > 0):
            return float(k[i])
        frac = (np.log(e[i - 1]) - np.log(target)) / (np.log(e[i - 1]) - np.log(e[i]))
        return float(k[i - 1] + frac * (k[i] - k[i - 1]))

    k_ref, k_other = first_at(reference), first_at(other)
    return k_ref / k_other - 1.0 if np.isfinite(k_ref) and np.isfinite(k_other) and k_other > 0 else float("nan")


def error_definition(likelihood: str | None) -> tuple[str, str]:
    """(short name, formula) of the error the training loop records for ``likelihood``."""
    lik = None if likelihood is None else str(likelihood).lower()
    return TRAINING_ERROR_DEFINITIONS.get(lik, ("error as recorded in the history", ""))


def figure_training_curves(
    histories: Mapping[str, pd.DataFrame],
    *,
    title: str | None = None,
    network: str | None = None,
    data: str | None = None,
    preset: str | None = None,
    likelihood: str | None = None,
    note: str | None = None,
) -> DrawnFigure:
    """Loss and error against iterations, training cases processed and wall-clock time.

    ``histories`` maps a run name to a DataFrame with columns ``iteration``, ``time`` (seconds of
    optimizer time), ``loss`` and optionally ``error`` and ``batch_size`` (as
    :func:`kfac_lens.optim.train` records them). Columns of axes: iteration (log scale) | cases
    processed (the cumulative sum of ``batch_size``: how many training cases the optimizer has seen,
    repeats counted; only when some history has ``batch_size``) | time. Rows: ``loss`` (the mini-batch
    loss ``train`` records: mean NLL per case on the iteration's mini-batch, before the update) and,
    when any run has ``error``, the error (recorded every few iterations on the whole training set);
    ``likelihood`` ("bernoulli", "gaussian", "categorical") names its definition on the axis and in
    the title (:data:`TRAINING_ERROR_DEFINITIONS`).

    The title names ``network``, ``data``, ``preset`` and ``note`` when given (``title`` replaces its first
    line).
    Metrics: all histories stacked with a ``run`` column (and ``cases_processed`` where defined).
    A history with a ``seed`` column of several seeds (:func:`kfac_lens.zoo.training_comparison` with
    ``seeds=``) is drawn as its median over the seeds with a min–max band (:func:`seed_band`).
    """
    has_error, xaxes = training_layout(histories)
    n_rows, n_cols = (2 if has_error else 1), len(xaxes)
    fig = Figure(figsize=(4.6 * n_cols, 3.6 * n_rows + 0.5), layout="constrained")
    df = draw_training_curves(fig, histories, TrainingLabels(title, network, data, preset, likelihood, note))
    meta = dict(figure="training_curves", error_definition=error_definition(likelihood) if has_error else None)
    return DrawnFigure(fig, df, meta=meta)


def training_comparison_labels(preset: str, data: str, iterations: int | None = None) -> dict:
    """Keyword arguments of :func:`figure_training_curves` that name what
    :func:`kfac_lens.zoo.training_comparison` trains: the deep autoencoder of ``preset`` (its layer
    widths as that function picks them), the data and the Bernoulli likelihood (its error is the
    squared reconstruction error per case); with ``iterations`` other than the preset's, a note that
    says K-FAC ran that many of them."""
    from ..zoo import AUTOENCODER_PRESETS

    p = AUTOENCODER_PRESETS[preset]
    note = None
    if iterations is not None and int(iterations) != p["iterations"]:
        note = f"K-FAC run for {int(iterations)} of the preset's {p['iterations']} iterations"
    sizes = [64, 48, 24, 8, 24, 48, 64] if data == "digits" else p["sizes"]  # as zoo.training_comparison
    what = "8×8 digits" if data == "digits" else f"{str(data).upper()} ({p['n_train']} cases)"
    return dict(network=f"autoencoder {'-'.join(str(v) for v in sizes)}", data=what, preset=preset,
                likelihood="bernoulli", note=note)


