"""Figure 7 (Appendix E.4): the improvement h(θ) − h(θ+δ) against γ, on a symlog axis.

The data come from :func:`kfac_lens.sweep.figure7_data`; :func:`draw_figure7` draws them on an axes
and is shared by :func:`figure7` and the RescalingExplorer.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from ..sweep import UpdateVariant, figure7_data
from .panels import DrawnFigure

__all__ = ["FIGURE7_STYLES", "draw_figure7", "figure7", "figure7_linthresh"]

FIGURE7_STYLES = {
    UpdateVariant.RESCALED_MOMENTUM: dict(color="tab:blue", marker="o"),
    UpdateVariant.RESCALED: dict(color="tab:green", marker="s"),
    UpdateVariant.RAW: dict(color="tab:red", marker="^"),
}


def figure7_linthresh(df: pd.DataFrame) -> float:
    """The symlog linear threshold of Figure 7's y axis, taken from the data.

    The smallest positive improvement of the re-scaled curves (or of any curve when they have none),
    so every positive value of those curves lies on the logarithmic part and none is flattened into
    the linear band around 0; 1 when no improvement is positive.
    """
    imp = df["improvement"].astype(float)
    rescaled = df["variant"].isin([v.value for v in UpdateVariant if v.rescale])
    for sel in (rescaled, np.ones(len(df), dtype=bool)):
        pos = imp[sel & (imp > 0) & np.isfinite(imp)]
        if len(pos):
            return float(pos.min())
    return 1.0


def symlog_ticks(values, linthresh: float) -> list[float]:
    """0 and ±10^k for the decades from the first one above ``linthresh`` to the data's extremes (none
    inside the linear band, where they would crowd the 0 label)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    k0 = math.ceil(math.log10(linthresh) + 1e-9)
    ticks = [0.0]
    for sign, top in ((1.0, v.max(initial=0.0)), (-1.0, -v.min(initial=0.0))):
        if top > linthresh:
            ticks += [sign * 10.0**k for k in range(k0, math.ceil(math.log10(top)) + 1)]
    return sorted(ticks)


def draw_figure7(ax, df: pd.DataFrame, chosen_gamma: float | None, variants=None) -> dict:
    """Draw Figure 7's curves on ``ax``: every point at its value, on a symlog y axis.

    The raw Δ can make h worse by many orders of magnitude while the re-scaled updates improve it by
    fractions, so the y axis is symmetric-logarithmic (``symlog``) with the linear threshold of
    :func:`figure7_linthresh` (the smallest positive re-scaled improvement): logarithmic above it and
    below minus it, linear in between. Nothing is clipped. The star marks the γ K-FAC chose (on the
    zero line, with a dashed vertical line). The legend sits outside the axes, to their right, so it
    covers no curve. Returns ``{variant: Line2D}``.
    """
    ax.clear()
    variants = list(UpdateVariant) if variants is None else [UpdateVariant(v) for v in variants]
    lines = {}
    shown = []
    for variant in variants:
        name = variant.value
        d = df[df["variant"] == name].sort_values("gamma")
        if d.empty:
            continue
        st = FIGURE7_STYLES[variant]
        (lines[name],) = ax.plot(d["gamma"].to_numpy(), d["improvement"].to_numpy(dtype=float), label=name,
                                 color=st.get("color"), marker=st.get("marker"), ms=4, lw=1.5)
        shown.append(d)
    linthresh = figure7_linthresh(pd.concat(shown) if shown else df)
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    ax.yaxis.set_major_locator(FixedLocator(symlog_ticks(df["improvement"], linthresh)))
    ax.axhline(0.0, color="0.3", lw=0.8)
    if "refused" in df.columns:  # γ without a value: K-FAC refused to invert the damped factors there
        grid = np.unique(df["gamma"].to_numpy(dtype=float))
        refused = set(df.loc[df["refused"].notna(), "gamma"].astype(float))
        label = "no value: K-FAC refuses to invert\nthe damped factors at this γ\n(too ill-conditioned)"
        for i, g in enumerate(grid):
            if g in refused:
                lo = math.sqrt(g * grid[i - 1]) if i > 0 else g / 1.5
                hi = math.sqrt(g * grid[i + 1]) if i + 1 < len(grid) else g * 1.5
                ax.axvspan(lo, hi, color="0.85", lw=0, zorder=0, label=label)
                label = None
    if chosen_gamma is not None:
        ax.axvline(chosen_gamma, color="0.4", ls="--", lw=1)
        ax.plot([chosen_gamma], [0.0], marker="*", color="black", ms=12, linestyle="none",
                label=f"γ chosen by K-FAC ({chosen_gamma:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("γ (factored Tikhonov strength)")
    ax.set_ylabel(f"improvement h(θ) − h(θ+δ)\n(symlog: linear for |y| < {linthresh:.2g})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return lines


def figure7(optimizer, X, y, gammas=None, *, lam=None, title=None, progress=False, dtype="auto") -> DrawnFigure:
    """Figure 7: the improvement h(θ) − h(θ+δ) against γ for the re-scaled update with and without K-FAC
    momentum and the raw Δ (Appendix E.4), on the network and data the optimizer is at (e.g. the zoo
    autoencoder at its captured iteration). Symlog y axis, every point at its value (the raw Δ can
    make h worse by millions while the re-scaled updates gain fractions); the star marks the γ K-FAC
    chose; the legend is outside the axes. ``dtype`` as in :func:`~kfac_lens.sweep.figure7_data` (by default a float32
    optimizer whose factors are too ill-conditioned at small γ is evaluated in float64, and the title
    says so). Returns a :class:`~kfac_lens.figures.panels.DrawnFigure` (figure and data)."""
    df = figure7_data(optimizer, X, y, gammas, lam=lam, progress=progress, dtype=dtype)
    fig = Figure(figsize=(8.6, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    draw_figure7(ax, df, optimizer.gamma)
    own = str(optimizer.view.dtype).removeprefix("torch.")
    used = str(df["dtype"].iloc[0])
    note = "" if used == own else (f"\ncomputed in {used}: the {own} factors are too ill-conditioned "
                                   "to invert at small γ")
    ax.set_title(title or f"Figure 7: update quality vs damping (iteration {optimizer.k - 1}, "
                          f"λ = {df['lam'].iloc[0]:.3g}){note}", fontsize=10)
    return DrawnFigure(fig, df, meta=dict(figure="figure7", gamma=optimizer.gamma, linthresh=figure7_linthresh(df)))


