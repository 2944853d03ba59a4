"""Companions of the main text's Figures 2 and 3 and the Appendix B decomposition (docs/math.md §3, §6, §9).

- :func:`figure_exact_vs_kfac`: F, F̃ and |F − F̃| (Figure 2), drawn by :func:`draw_exact_vs_kfac`, which
  the FisherExplorer shares;
- :func:`figure_inverse_structure`: F̃ beside F̃⁻¹ (Figure 3);
- :func:`figure_cumulants`: block (k, l) of F − F̃ beside its cumulant terms, drawn by
  :func:`draw_cumulants` on a :func:`cumulant_grid`, which the FisherExplorer shares too.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from ..curvature.blocks import block_mass, block_pairs, neighbour_share_chance
from ..curvature.compare import block_errors
from ..curvature.cumulants import CumulantTerms, cumulant_terms
from ..study import CurvatureStudy, layer_label
from .panels import DrawnFigure, PanelGrid, fmt_level, shared_vmax

__all__ = [
    "CUMULANT_PANELS",
    "cumulant_grid",
    "draw_cumulants",
    "draw_exact_vs_kfac",
    "draw_inverse_structure",
    "figure_cumulants",
    "figure_exact_vs_kfac",
    "figure_inverse_structure",
    "inverse_structure_title",
]

EXACT_VS_KFAC_TITLES = (r"exact $F$", r"$\tilde F$ (K-FAC)", r"$|F - \tilde F|$")


# ============================================================================ F vs F̃ (Figure 2)
def draw_exact_vs_kfac(grid: PanelGrid, study: CurvatureStudy, *, vmax: float | None = None) -> float:
    """Draw F | F̃ | |F − F̃| on the first row of ``grid`` (in place), one shared white level (returned)."""
    F, Ft = study.F, study.F_tilde
    mats = [F, Ft, F - Ft]
    vmax = shared_vmax(mats) if vmax is None else float(vmax)
    for p, title, M in zip(grid.panels[0], EXACT_VS_KFAC_TITLES, mats):
        p.set_title(title)
        p.show(M, vmax, study.sizes, study.labels)
        if grid.colorbars:
            p.add_colorbar()
    grid.suptitle(
        f"Exact Fisher vs its Kronecker-factored approximation, {study.name}, "
        f"layers {study.labels[0]}–{study.labels[-1]} (P = {study.n_params})\n"
        f"absolute values; white level {fmt_level(vmax)} shared by all panels",
    )
    return vmax


def figure_exact_vs_kfac(study: CurvatureStudy, *, vmax: float | None = None) -> DrawnFigure:
    """Exact F, F̃ and |F − F̃| side by side (the main text's Figure 2), one shared white level.

    The white level is in the figure's title and each panel has a slim colourbar.
    Metrics: :func:`~kfac_lens.block_errors` of F̃ against F (overall and per block), with ``vmax``.
    """
    grid = PanelGrid.create(1, 3, colorbars=True)
    vmax = draw_exact_vs_kfac(grid, study, vmax=vmax)
    df = block_errors(study.F_tilde, study.F, study.sizes, labels=study.labels, name="F̃ vs F")
    df["vmax"] = vmax
    panels = list(grid.panels[0])
    return DrawnFigure(grid.figure, df, panels, list(panels),
                       dict(figure="exact_vs_kfac", vmax=vmax, layers=study.layers))


# ============================================================================ F̃ and F̃⁻¹ (Figure 3)
def draw_inverse_structure(grid: PanelGrid, study: CurvatureStudy, gamma: float) -> pd.DataFrame:
    """Draw F̃ | F̃⁻¹ (damped) on a 1×2 ``grid``, each at its own white level; returns the mass table."""
    g = float(gamma)
    Ft, Fd, Finv = study.F_tilde, study.F_tilde_damped(g), study.F_tilde_inverse(g)
    vmaxes = []
    for p, title, M in zip(grid.panels[0], (r"$\tilde F$", rf"$\tilde F^{{-1}}$ (damped, γ = {fmt_level(g)})"),
                           (Ft, Finv)):
        if M is Finv:
            blocks = [M[si, sj].reshape(-1) for i, j, si, sj, _ in block_pairs(study.sizes) if i != j]
            v = shared_vmax([torch.cat(blocks)]) if blocks else shared_vmax([M])
        else:
            v = shared_vmax([M])
        p.set_title(title + f", white = {fmt_level(v)}")
        p.show(M, v, study.sizes, study.labels)
        if grid.colorbars:
            p.add_colorbar()
        vmaxes.append(v)
    chance = neighbour_share_chance(study.sizes)
    rows = []
    for name, M, v in (
        ("F̃", Ft, vmaxes[0]),
        ("F̃ (damped)", Fd, float("nan")),
        ("F̃⁻¹ (damped F̃)", Finv, vmaxes[1]),
    ):
        rows.append(
            {"matrix": name, "gamma": g if name != "F̃" else 0.0, **block_mass(M, study.sizes), "vmax": v,
             "neighbour_share_chance": chance}
        )
    df = pd.DataFrame(rows)
    grid.suptitle(inverse_structure_title(study.name, g, df))
    return df


def figure_inverse_structure(study: CurvatureStudy, gamma: float) -> DrawnFigure:
    """F̃ beside F̃⁻¹ (the main text's Figure 3), titled with how block-tridiagonal the inverse is.

    F̃⁻¹ is the inverse of the damped F̃ at ``gamma``. Exception to the shared white level, as in the
    paper's Figure 3: F̃ and its inverse differ in scale by orders of magnitude, so each panel has its
    own vmax (the ``vmax`` column, in the panel's title and on its colourbar): the 99.5th percentile
    of |F̃|, and for F̃⁻¹ that of its *off-diagonal blocks*, so that its strong diagonal blocks
    saturate and the contrast between the neighbouring blocks and those beyond them shows.

    The title states, computed from the matrices, the share of ‖F̃⁻¹‖_F² in the diagonal blocks and
    the share of the rest that sits on the neighbouring blocks, next to its chance level
    (:func:`~kfac_lens.curvature.blocks.neighbour_share_chance`) and to the same share for F̃ itself.
    How block-tridiagonal F̃⁻¹ looks depends strongly on γ: heavy damping makes it nearly
    block-diagonal.

    Metrics (one row per matrix: F̃, damped F̃, F̃⁻¹): fractions of the squared Frobenius mass on the
    diagonal blocks, the neighbouring blocks and beyond (:func:`~kfac_lens.curvature.blocks.block_mass`),
    and ``neighbour_share_chance``.
    """
    g = float(gamma)
    grid = PanelGrid.create(1, 2, panel_inches=4.0, colorbars=True, extra_top=0.3)  # a 3-line title
    df = draw_inverse_structure(grid, study, g)
    panels = list(grid.panels[0])
    vmaxes = (float(df["vmax"].iloc[0]), float(df["vmax"].iloc[-1]))
    return DrawnFigure(grid.figure, df, panels, list(panels),
                       dict(figure="inverse_structure", vmax=vmaxes, gamma=g, layers=study.layers))


def inverse_structure_title(name: str, gamma: float, df: pd.DataFrame) -> str:
    """The title of :func:`figure_inverse_structure`, from its DataFrame's numbers."""
    ft, inv = df.iloc[0], df.iloc[-1]
    chance = float(inv["neighbour_share_chance"])
    return (
        f"$\\tilde F$ and the inverse of the damped $\\tilde F$ (γ = {fmt_level(gamma)}), {name}\n"
        f"$\\tilde F^{{-1}}$: {percent(inv['diagonal_mass'])} of its squared mass is in the diagonal blocks; "
        f"of the remaining {percent(1 - inv['diagonal_mass'])}, "
        f"{percent(inv['neighbour_share_of_off_diagonal'])} is on the neighbouring blocks\n"
        f"(chance level, by entry count: {percent(chance)}; "
        f"$\\tilde F$ itself: {percent(ft['neighbour_share_of_off_diagonal'])} of its "
        f"{percent(1 - ft['diagonal_mass'])} off-diagonal mass)"
    )


def percent(x: float) -> str:
    """A fraction as a percentage with enough digits to tell it from 0% and 100%."""
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    v = 100 * x
    for d in (0, 1, 2, 3):
        txt = f"{v:.{d}f}"
        if float(txt) not in (0.0, 100.0) or v in (0.0, 100.0):
            return txt + "%"
    return f"{v:.2g}%"


# ============================================================================ Appendix B
CUMULANT_PANELS = (
    ("difference", r"$F - \tilde F$"),
    ("kappa4", r"$\kappa(\bar a^{(1)}, g^{(1)}, \bar a^{(2)}, g^{(2)})$"),
    ("mean_a1_kappa3", r"$\kappa(\bar a^{(1)})\,\kappa(\bar a^{(2)}, g^{(1)}, g^{(2)})$"),
    ("mean_a2_kappa3", r"$\kappa(\bar a^{(2)})\,\kappa(\bar a^{(1)}, g^{(1)}, g^{(2)})$"),
    ("residual", "residual"),
)


def cumulant_grid(panel_inches: float = 3.0, *, colorbars: bool = False,
                  max_pixels: int | None = None) -> PanelGrid:
    """An empty 1×5 grid for the Appendix B panels, titled (fill it with :func:`draw_cumulants`)."""
    grid = PanelGrid.create(1, len(CUMULANT_PANELS), panel_inches=panel_inches, colorbars=colorbars,
                            max_pixels=max_pixels)
    for p, (_, title) in zip(grid.panels[0], CUMULANT_PANELS):
        p.set_title(title)
    return grid


def draw_cumulants(grid: PanelGrid, terms: CumulantTerms, vmax: float | None = None) -> float:
    """Show the Appendix B terms of ``terms`` on a :func:`cumulant_grid` (in place).

    Shared white level: the 99.5th percentile of |entries| pooled over the five panels. Returns it.
    """
    mats = [terms.as_block(name) for name, _ in CUMULANT_PANELS]
    vmax = shared_vmax(mats) if vmax is None else float(vmax)
    k, l = terms.k, terms.l
    panels = grid.panels[0]
    for p, M in zip(panels, mats):
        p.show(M, vmax)
        if grid.colorbars:
            p.add_colorbar()
        p.ax.set_xlabel(f"{layer_label(l)}: (ā index, g index)", fontsize=8)
    panels[0].ax.set_ylabel(f"{layer_label(k)}: (ā index, g index)", fontsize=8)
    note = "exact over y" if terms.exact else f"estimator {terms.estimator!r}: the identity need not hold"
    grid.suptitle(
        f"Appendix B: block ({layer_label(k)}, {layer_label(l)}) of $F - \\tilde F$ = sum of three "
        f"cumulant terms ({note}); white = {fmt_level(vmax)}",
    )
    return vmax


def figure_cumulants(
    model,
    X,
    likelihood,
    k: int,
    l: int,
    *,
    y=None,
    estimator: str | None = None,
    terms: CumulantTerms | None = None,
    vmax: float | None = None,
    **kw,
) -> DrawnFigure:
    """Block (k, l) of F − F̃ beside each Appendix B term and the residual (docs/math.md §6).

    Panels: ``F − F̃`` | ``κ(ā₁,g₁,ā₂,g₂)`` | ``κ(ā₁)κ(ā₂,g₁,g₂)`` | ``κ(ā₂)κ(ā₁,g₁,g₂)`` | residual,
    absolute values, shared white level; rows are (ā_k index, g_k index) = ``k1·d_k + k2`` as in the
    paper layout. ``model`` may also be a :class:`~kfac_lens.study.CurvatureStudy` (then X and
    likelihood are ignored and its cached terms are used). ``terms`` skips the computation. ``kw`` goes
    to :func:`~kfac_lens.cumulant_terms` (``samples``, ``seed`` for sampled estimators).

    Metrics: :meth:`CumulantTerms.summary` (Frobenius norm of each term and relative to ‖F − F̃‖),
    with ``vmax``.
    """
    if terms is None:
        if isinstance(model, CurvatureStudy):
            terms = model.cumulants(k, l, estimator=estimator, **kw)
        else:
            terms = cumulant_terms(model, X, likelihood, k, l, estimator=estimator, y=y, **kw)
    grid = cumulant_grid(colorbars=True)
    used = draw_cumulants(grid, terms, vmax)
    df = terms.summary()
    df["vmax"] = used
    panels = list(grid.panels[0])
    return DrawnFigure(grid.figure, df, panels, list(panels),
                       dict(figure="cumulants", vmax=used, block=(terms.k, terms.l)))
