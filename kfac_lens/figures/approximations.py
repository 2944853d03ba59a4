"""How approximation quality evolves as a network trains: each approximation against the exact Fisher.

For each stored iteration of a zoo network (:attr:`kfac_lens.zoo.ZooEntry.snapshot_iterations` and the
captured one), :func:`approximation_history` runs :func:`kfac_lens.compare_approximations` (dense, exact
float64) on the same cases: the relative Frobenius error ‖F − F_approx‖_F / ‖F‖_F of K-FAC's F̃ (Section 3),
F̆ and F̂ (Sections 3.2, 3.3), EK-FAC (George et al. 2018), the diagonal and the exact block-diagonal, and the
cosine between each approximate natural-gradient direction and the exact damped one at the γ K-FAC held.
:func:`draw_approximation_history` draws both against the iteration; :func:`figure_approximations` is the
CLI's figure (``kfac-lens figures --fig approximations``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..curvature.approximations import APPROXIMATIONS
from ..curvature.quality import compare_approximations
from .panels import DrawnFigure

__all__ = ["approximation_history", "draw_approximation_history", "figure_approximations"]

#: Line styles by approximation name: the K-FAC family solid, the references dashed.
STYLES = {
    "kfac": dict(color="C0", ls="-", marker="o"),
    "kfac-blockdiag": dict(color="C1", ls="-", marker="s"),
    "kfac-tridiag": dict(color="C2", ls="-", marker="^"),
    "ekfac": dict(color="C3", ls="--", marker="D"),
    "diagonal": dict(color="C4", ls="--", marker="v"),
    "blockdiag-exact": dict(color="C5", ls=":", marker="x"),
    "kfac-reduce": dict(color="C6", ls="-.", marker="P"),
}

#: The figure's default approximations: every one but "kfac-reduce", which is "kfac-blockdiag" itself on the
#: MLPs the figure examines (every layer used once per case) and would only hide its line.
FIGURE_APPROXIMATIONS = tuple(a for a in APPROXIMATIONS if a != "kfac-reduce")


def approximation_history(entry, X, y, likelihood: str, *, layers=None, gamma: float | None = None,
                          approximations: Sequence[str] = FIGURE_APPROXIMATIONS, iterations=None,
                          progress: bool = False) -> pd.DataFrame:
    """:func:`~kfac_lens.compare_approximations` (dense) of the zoo network ``entry`` at each of ``iterations``
    (default: every stored one), on the cases X (targets y for the natural-gradient cosine), at damping
    ``gamma`` (default: the γ K-FAC held at the captured iteration), for ``approximations`` (default
    ``FIGURE_APPROXIMATIONS``: all but "kfac-reduce"). One row per (iteration, approximation)."""
    stored = sorted(set(entry.snapshot_iterations) | {entry.iteration})
    iterations = stored if iterations is None else [int(i) for i in iterations]
    bad = [i for i in iterations if i not in stored]
    if bad:
        raise ValueError(f"iterations {bad} are not stored for {entry.name}; it has weights for {stored}.")
    gamma = float(entry.gamma) if gamma is None else float(gamma)
    parts = []
    for it in tqdm(iterations, desc="approximations over training", disable=not progress, leave=False):
        df = compare_approximations(entry.at_iteration(it), X, likelihood, approximations, y=y, gamma=gamma,
                                    method="dense", layers=layers, spectra=[])
        parts.append(df.assign(iteration=it))
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(network=entry.name, gamma=gamma, n_cases=int(X.shape[0]),
                     layers=None if layers is None else list(layers), iterations=list(iterations))
    return out


def draw_approximation_history(fig: Figure, history: pd.DataFrame) -> dict:
    """Two panels on ``fig``: the relative Frobenius error against the iteration (log scale), and the cosine
    of each approximate natural-gradient direction with the exact damped one. Returns the axes by name."""
    ax_err, ax_cos = fig.subplots(1, 2)
    for name, rows in history.groupby("approximation", sort=False):
        rows = rows.sort_values("iteration")
        style = STYLES.get(name, {})
        ax_err.plot(rows["iteration"], rows["rel_frobenius"], label=name, ms=4, **style)
        if rows["ng_cosine"].notna().any():
            ax_cos.plot(rows["iteration"], rows["ng_cosine"], label=name, ms=4, **style)
    ax_err.set_yscale("log")
    ax_err.set_xlabel("training iteration (K-FAC)")
    ax_err.set_ylabel(r"$\|F - F_{\mathrm{approx}}\|_F \,/\, \|F\|_F$")
    ax_err.set_title("error against the exact Fisher (undamped)")
    gamma = history.attrs.get("gamma")
    ax_cos.set_xlabel("training iteration (K-FAC)")
    ax_cos.set_ylabel("cosine with the exact natural gradient")
    ax_cos.set_title(f"natural-gradient direction at γ = {gamma:.3g}" if gamma is not None
                     else "natural-gradient direction")
    for ax in (ax_err, ax_cos):
        ax.grid(True, alpha=0.3)
    ax_cos.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    return {"error": ax_err, "cosine": ax_cos}


def figure_approximations(history: pd.DataFrame, *, title: str | None = None) -> DrawnFigure:
    """The CLI's figure of :func:`approximation_history`, with the table as its metrics."""
    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    draw_approximation_history(fig, history)
    a = history.attrs
    layers = a.get("layers")
    fig.suptitle(title or (f"Approximations of the exact Fisher as {a.get('network', 'the network')} trains "
                           f"({a.get('n_cases', '?')} cases"
                           + (f", layers {', '.join(f'W{k + 1}' for k in layers)}" if layers else "") + ")"))
    metrics = history.drop(columns=[c for c in ("top_eigs_F", "top_eigs_precond") if c in history])
    return DrawnFigure(fig, metrics.reset_index(drop=True),
                       meta={k: v for k, v in a.items() if k in ("network", "gamma", "n_cases")})
