"""Appendix C, Figures 5 and 6: F̃ against F̆ and F̂, and F̃⁻¹ against F̆⁻¹ and F̂⁻¹ (docs/math.md §5, §9).

Each row of a comparison grid is reference | approximation | |difference|, one shared white level
taken from the difference panels. :func:`draw_figure6` fills a grid in place, so the DampingExplorer
redraws Figure 6 with the same code as :func:`figure6`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..curvature.blocks import BlockKind, off_tridiagonal_mask
from ..curvature.compare import block_errors
from ..study import CurvatureStudy, Inverse
from .panels import DrawnFigure, MatrixPanel, PanelGrid, fmt_level, numpy_abs, numpy_abs_diff, shared_vmax

__all__ = ["draw_figure5", "draw_figure6", "figure5", "figure6"]

# What a comparison row shows for each approximate inverse (Figure 6).
INVERSE_SYMBOLS = {Inverse.BLOCK_DIAGONAL: r"\breve F^{-1}", Inverse.BLOCK_TRIDIAGONAL: r"\hat F^{-1}"}
FIGURE6_ROWS = (Inverse.BLOCK_DIAGONAL, Inverse.BLOCK_TRIDIAGONAL)


def _abs_row(ref, approx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """|reference|, |approximation| and |reference − approximation| as float64 arrays."""
    return numpy_abs(ref), numpy_abs(approx), numpy_abs_diff(ref, approx)


def _comparison_vmax(abs_rows) -> float:
    """The white level of a comparison grid: from the differences, or the matrices if those are all 0."""
    diffs = [d for _, _, d in abs_rows]
    if any(bool(d.any()) for d in diffs):
        return shared_vmax(diffs, absolute=True)
    return shared_vmax([m for r, a, _ in abs_rows for m in (r, a)], absolute=True)  # nothing in the differences


def _show_comparison_rows(grid: PanelGrid, titles, abs_rows, sizes, labels, vmax: float) -> list[MatrixPanel]:
    """Fill the first ``len(abs_rows)`` rows of ``grid``: |reference| | |approximation| | |difference|."""
    panels = []
    for r, (row_titles, row) in enumerate(zip(titles, abs_rows)):
        for c, (title, data) in enumerate(zip(row_titles, row)):
            p = grid.panels[r][c]
            p.set_title(title)
            p.show_abs(data, vmax, sizes, labels)
            if grid.colorbars:
                p.add_colorbar()
            panels.append(p)
    return panels


# ============================================================================ Figure 5
def draw_figure5(grid: PanelGrid, study: CurvatureStudy, gamma: float, *, fallback: bool = False,
                 vmax: float | None = None) -> dict:
    """Draw Figure 5 on a 2×4 ``grid``: F̃ | F̆ | |F̃ − F̆| over F̃ | F̂ | |F̃ − F̂|, F̂'s
    off-tridiagonal zoom bottom right and notes above it. Returns ``{"vmax", "zoom_vmax", "panels",
    "zoom_panel", "metrics"}``."""
    g = float(gamma)
    ref = study.F_tilde_damped(g)
    breve = study.blockdiag_approximation(g)
    hat = study.tridiag_approximation(g)
    tref = r"$\tilde F$" if g == 0 else r"$\tilde F$ (damped)"
    titles = [
        (tref, r"$\breve F$ (block-diagonal inverse)", r"$|\tilde F - \breve F|$"),
        (tref, r"$\hat F$ (block-tridiagonal inverse)", r"$|\tilde F - \hat F|$"),
    ]
    if g == 0:
        damp = "undamped (γ = 0)"
    else:
        damp = f"γ = {fmt_level(g)}" + (" — tiny fallback: factors singular at γ = 0" if fallback else "")
    title = (
        f"Figure 5: $\\tilde F$ vs $\\breve F$ (top) and $\\hat F$ (bottom), {study.name}, "
        f"layers {study.labels[0]}–{study.labels[-1]}, P = {study.n_params}, {damp}"
    )
    diff = ref - hat
    mask = off_tridiagonal_mask(study.sizes, diff.device)
    has_off = bool(mask.any())
    zoom_vmax = shared_vmax([diff[mask]]) if has_off else shared_vmax([diff])
    abs_rows = [_abs_row(ref, breve), _abs_row(ref, hat)]
    vmax = _comparison_vmax(abs_rows) if vmax is None else float(vmax)
    panels = _show_comparison_rows(grid, titles, abs_rows, study.sizes, study.labels, vmax)
    grid.suptitle(f"{title}\nabsolute values; white level {fmt_level(vmax)} shared by the six left panels; "
                  f"the bottom-right zoom has its own ({fmt_level(zoom_vmax)})")
    zoom = grid.panels[1][3]
    zoom.set_title((r"off-tridiag. $|\tilde F - \hat F|$" if has_off else r"$|\tilde F - \hat F|$")
                   + f", white = {fmt_level(zoom_vmax)}")
    zoom.show(diff, zoom_vmax, study.sizes, study.labels)
    if grid.colorbars:
        zoom.add_colorbar()
    parts = []
    for name, approx, exact in (
        ("F̆ (block-diagonal)", breve, {BlockKind.DIAGONAL}),
        ("F̂ (block-tridiagonal)", hat, {BlockKind.DIAGONAL, BlockKind.TRIDIAGONAL}),
    ):
        df = block_errors(approx, ref, study.sizes, labels=study.labels, name=name)
        df["exact_by_construction"] = [kd in {k.value for k in exact} for kd in df["kind"]]
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df["reproduced"] = df["rel_error"] < 1e-6
    df["gamma"] = g
    df["vmax"] = vmax
    df["zoom_vmax"] = zoom_vmax
    _figure5_notes(grid.axes[0, 3], df, diff, ref, mask, vmax, zoom_vmax)
    return {"vmax": vmax, "zoom_vmax": zoom_vmax, "panels": panels, "zoom_panel": zoom, "metrics": df}


def figure5(study: CurvatureStudy, gamma: float | None = None, *, vmax: float | None = None) -> DrawnFigure:
    """Appendix C, Figure 5: F̃ vs its approximations F̆ (top row) and F̂ (bottom row).

    Each row: F̃ | approximation | |F̃ − approximation|, absolute values, one shared white level. F̆
    keeps F̃'s diagonal blocks, F̂ reproduces its tridiagonal blocks (so those blocks of the
    difference are exactly 0) and, the paper's point, also approximates the off-tridiagonal blocks well.

    At the shared level |F̃ − F̂| is black: its off-tridiagonal blocks are a few per cent of F̃'s. So a
    fourth panel (bottom right) shows |F̃ − F̂| again at **its own white level**, the 99.5th percentile
    of its off-tridiagonal entries (``zoom_vmax``, stated in its title; with fewer than three layers
    there are no such blocks and the level is that of the whole difference), and the panel above it
    lists the relative error of F̂ on each off-tridiagonal block. Every matrix panel has a colourbar.

    As in the paper the matrices are **undamped** (γ = 0). If the factors or the Schur complements
    Σ_{k|k+1} are singular at γ = 0, a tiny γ (:meth:`CurvatureStudy.default_small_gamma`) is used
    instead, the title says so and ``df.attrs["gamma_fallback"]`` is True. Pass ``gamma`` to choose.

    Metrics: :func:`~kfac_lens.block_errors` of F̆ and F̂ against F̃ (per block and overall) with
    ``exact_by_construction`` (the blocks an approximation reproduces by definition: diagonal for F̆,
    tridiagonal for F̂), ``reproduced`` (``rel_error < 1e-6``; must be True where exact by
    construction), ``gamma``, ``vmax`` and ``zoom_vmax``.
    """
    g, fallback = study.comparison_gamma(gamma)
    grid = PanelGrid.create(2, 4, panel_inches=3.0, colorbars=True)
    out = draw_figure5(grid, study, g, fallback=fallback, vmax=vmax)
    meta = dict(figure="figure5", vmax=out["vmax"], zoom_vmax=out["zoom_vmax"], gamma=g, gamma_fallback=fallback,
                layers=study.layers)
    return DrawnFigure(grid.figure, out["metrics"], out["panels"], [*out["panels"], out["zoom_panel"]], meta,
                       zoom_panel=out["zoom_panel"])


def _figure5_notes(ax, df, diff, ref, mask, vmax: float, zoom_vmax: float) -> None:
    """The text beside Figure 5's zoom: F̂'s relative error on each off-tridiagonal block (from ``df``)."""
    ax.set_axis_off()
    hat = df[df["comparison"].str.startswith("F̂") & (df["kind"] == BlockKind.OFF_TRIDIAGONAL.value)]
    lines = [r"$\hat F$ reproduces the tridiagonal blocks of $\tilde F$", "(difference 0 up to rounding)."]
    if len(hat):
        seen, per_block = set(), []
        for _, r in hat.iterrows():
            key = tuple(sorted((r["block_row"], r["block_col"])))
            if key not in seen:
                seen.add(key)
                per_block.append(f"  ({key[0]}, {key[1]}):  {r['rel_error']:.1%}")
        total = float(torch.linalg.norm(diff[mask]) / torch.linalg.norm(ref[mask]))
        lines += ["", r"Off-tridiagonal blocks, $\|\tilde F - \hat F\|_F\,/\,\|\tilde F\|_F$:"]
        lines += per_block[:10] + (["  …"] if len(per_block) > 10 else [])
        lines += [f"  all of them:  {total:.1%}", r"($\breve F$ puts zeros there: 100%)"]
    else:
        lines += ["", "No off-tridiagonal blocks (fewer than 3 layers):", r"$\hat F$ equals $\tilde F$."]
    lines += ["", f"Zoom below: white = {fmt_level(zoom_vmax)},",
              f"{vmax / zoom_vmax:.3g}× finer than the shared {fmt_level(vmax)}."]
    ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            linespacing=1.35)


# ============================================================================ Figure 6
def figure6_title(study: CurvatureStudy, gamma: float, vmax: float) -> str:
    """Figure 6's title: what is compared, on which network and layers, at which γ and white level."""
    return (
        f"Figure 6: $\\tilde F^{{-1}}$ vs $\\breve F^{{-1}}$ (top) and $\\hat F^{{-1}}$ (bottom), "
        f"{study.name}, layers {study.labels[0]}–{study.labels[-1]}, factored Tikhonov γ = {fmt_level(gamma)}"
        f"\nabsolute values; white level {fmt_level(vmax)} shared by all panels"
    )


def draw_figure6(grid: PanelGrid, study: CurvatureStudy, gamma: float,
                 inverses: Sequence[Inverse] = FIGURE6_ROWS, *, vmax: float | None = None,
                 title: Callable[[float], str] | None = None) -> float:
    """Draw Figure 6 on the first ``len(inverses)`` rows of a 3-column ``grid`` (in place).

    Row r: F̃⁻¹ | ``inverses[r]`` | their absolute difference. The white level (returned) is that of
    both difference panels, F̆⁻¹'s and F̂⁻¹'s, whichever rows are shown, so hiding a row changes no
    colour. Rows beyond ``len(inverses)`` are hidden and the figure shrinks to fit. ``title(vmax)``
    replaces Figure 6's title (:func:`figure6_title`).
    """
    g = float(gamma)
    ref = study.F_tilde_inverse(g)
    abs_ref = numpy_abs(ref)
    approx = {inv: study.inverse(inv, g) for inv in FIGURE6_ROWS}
    abs_rows = {inv: (abs_ref, numpy_abs(M), numpy_abs_diff(ref, M)) for inv, M in approx.items()}
    vmax = _comparison_vmax(list(abs_rows.values())) if vmax is None else float(vmax)
    titles = []
    for inv in inverses:
        sym = INVERSE_SYMBOLS[inv]
        titles.append((r"$\tilde F^{-1}$", f"${sym}$ ({inv.value})", rf"$|\tilde F^{{-1}} - {sym}|$"))
    grid.show_rows(len(inverses))
    _show_comparison_rows(grid, titles, [abs_rows[inv] for inv in inverses], study.sizes, study.labels, vmax)
    grid.suptitle(figure6_title(study, g, vmax) if title is None else title(vmax))
    return vmax


def figure6(study: CurvatureStudy, gamma: float, *, vmax: float | None = None) -> DrawnFigure:
    """Appendix C, Figure 6: F̃⁻¹ vs F̆⁻¹ (top row) and F̂⁻¹ (bottom row), with absolute differences.

    All three inverses use factored Tikhonov damping with strength ``gamma`` (Appendices E.3, E.6; the
    paper used the γ that K-FAC held at that iteration). **F̃⁻¹ here is the inverse of the damped F̃**
    (docs/math.md §4: the diagonal factors Ā_kk + πγI, G_kk + (γ/π)I, cross factors undamped), the matrix
    whose tridiagonal blocks F̂ reproduces; F̆⁻¹ and F̂⁻¹ are built from the same damped factors.

    Metrics: relative Frobenius errors of F̆⁻¹ and F̂⁻¹ against F̃⁻¹, overall and per block kind
    (:func:`~kfac_lens.error_by_kind`), with ``gamma`` and ``vmax``. The paper's claim: F̂⁻¹ is the
    better approximation, even on the diagonal blocks.
    """
    g = float(gamma)
    grid = PanelGrid.create(2, 3, panel_inches=3.0, colorbars=True)
    used = draw_figure6(grid, study, g, vmax=vmax)
    df = study.inverse_errors(g).copy()
    df["vmax"] = used
    panels = [p for row in grid.panels for p in row]
    meta = dict(figure="figure6", vmax=used, gamma=g, layers=study.layers)
    return DrawnFigure(grid.figure, df, panels, list(panels), meta)
