"""The paper's figures, one function per figure, each returning ``(Figure, DataFrame)``.

Martens & Grosse (2015), Appendix C (Figures 5 and 6) and companions of the main text's Figures 2
and 3; docs/math.md §9 fixes the display convention, which every matrix panel here follows:

- **absolute values** of the entries, drawn with ``imshow`` in the ``"gray"`` colormap (0 is black,
  large is white), ``vmin = 0`` and one ``vmax`` shared by every matrix panel of a figure;
- **vmax** is the ``VMAX_QUANTILE``-th percentile (99.5) of the absolute entries pooled over a
  figure's panels (:func:`shared_vmax`). The paper clips its white level "up to some maximum"; a high
  quantile rather than the maximum keeps the picture from going black when a few entries (the
  diagonal of a damped inverse) dominate. In the comparison figures (5 and 6) the pool is the
  *difference* panels: the differences are what the figure is about, and on Figure 6 they are ~30×
  smaller than F̃⁻¹'s entries, so a level taken from F̃⁻¹ would leave them black (the paper's own
  Figure 6 saturates the diagonal blocks of F̃⁻¹ the same way). Where the differences are all zero
  the pool is the matrices. :func:`figure_exact_vs_kfac` and :func:`figure_cumulants` pool all their
  panels; :func:`figure_inverse_structure` gives each panel its own level, as the paper's Figure 3
  does, and so does Figure 5's extra zoom of |F̃ − F̂| (its off-tridiagonal blocks are a few per
  cent of F̃'s, black at the shared level). The value is in the DataFrame's ``vmax`` column,
  ``df.attrs["vmax"]``, ``fig.kfac_lens["vmax"]`` and the figure's title (a panel with a level of
  its own states it in its own title);
- a slim **colourbar** right of every matrix panel of the figure functions (0 to the white level,
  which it labels; the widgets go without), and ``fig.kfac_matrix_panels`` lists every matrix panel;
- **block boundaries** as thin coloured lines at the layer-block edges, with ticks at the edges and
  each block labelled by its layer in the paper's 1-based naming (0-based layer k is ``W{k+1}``, so
  the example network's middle layers ``[1, 2, 3, 4]`` are W2..W5);
- the paper's parameter layout (docs/math.md §1) for every matrix.

All figures use the object-oriented API (``matplotlib.figure.Figure``), never pyplot, so they work
under Agg, in notebooks and inside widgets (:mod:`kfac_lens.widgets`) without touching global state.

The expensive pieces are computed once per (model, X, y, likelihood, layers) by
:class:`CurvatureStudy`: the exact Fisher F, the Kronecker factors (exact estimator, all pairs), F̃,
∇h and an eigendecomposition of F. Everything that depends on the damping γ (damped F̃, F̃⁻¹, F̆⁻¹,
F̂⁻¹, natural-gradient directions, error tables) is memoised per γ.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FixedLocator

from .curvature.compare import block_errors, direction_errors, error_by_kind
from .curvature.cumulants import CumulantTerms, cumulant_terms
from .curvature.factors import KroneckerFactors, kronecker_factors
from .curvature.fisher import exact_fisher
from .curvature.inverses import BlockDiagonalInverse, BlockTridiagonalInverse
from .errors import SingularFactorError
from .likelihoods import get_likelihood
from .nets import NetworkView, mats_to_vec

__all__ = [
    "DEFAULT_DPI",
    "VMAX_QUANTILE",
    "CurvatureStudy",
    "MatrixPanel",
    "block_mass",
    "cumulant_figure",
    "draw_cumulants",
    "figure5",
    "figure6",
    "figure7",
    "figure7_data",
    "figure7_gammas",
    "figure7_linthresh",
    "draw_figure7",
    "figure_cumulants",
    "figure_exact_vs_kfac",
    "figure_inverse_structure",
    "figure_training_curves",
    "training_comparison_labels",
    "layer_label",
    "mean_pool",
    "neighbour_share_chance",
    "save_figure",
    "shared_vmax",
]

VMAX_QUANTILE = 99.5  # percentile of |entries| used as the shared white level
DEFAULT_DPI = 130  # save_figure's resolution
CMAP = "gray"  # 0 is black, large is white (Appendix C)
BLOCK_LINE_COLOR = "tab:red"  # layer-block boundaries
BLOCK_LINE_WIDTH = 0.6
COLORBAR_PAD = 0.07  # inches between a matrix panel and its colourbar
COLORBAR_WIDTH = 0.11  # inches
# Downsampling filter for panels with more entries than pixels: "antialiased" averages neighbouring
# entries instead of dropping rows/columns as "nearest" would (a damped inverse's bright diagonal
# would otherwise flicker in and out).
INTERPOLATION = "antialiased"
_QUANTILE_SAMPLE = 2_000_000  # at most this many pooled entries enter the quantile (a fixed stride)


# ============================================================================ display helpers
def layer_label(k: int) -> str:
    """The paper's 1-based name of 0-based Linear layer k: layer 1 → "W2"."""
    return f"W{int(k) + 1}"


def _numpy_abs(M) -> np.ndarray:
    if isinstance(M, torch.Tensor):
        return M.detach().to("cpu", torch.float64).abs().numpy()
    return np.abs(np.asarray(M, dtype=np.float64))


def shared_vmax(matrices: Sequence, quantile: float = VMAX_QUANTILE) -> float:
    """The white level shared by a figure's panels: the ``quantile``-th percentile of |entries|.

    Entries of all ``matrices`` are pooled (a fixed stride keeps at most about 2 million of them, so
    the value is deterministic and cheap for P = 1680). Falls back to the largest |entry| when the
    quantile is 0 (mostly-zero panels) and to 1 for all-zero input, so vmax is always > 0.
    """
    flats = [
        np.abs(np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float64)).ravel()
        for m in matrices
    ]
    total = sum(f.size for f in flats)
    if total == 0:
        return 1.0
    stride = max(1, math.ceil(total / _QUANTILE_SAMPLE))
    pooled = np.concatenate([f[::stride] for f in flats])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return 1.0
    v = float(np.percentile(pooled, quantile))
    if not v > 0:
        v = float(
            max(float(np.max(np.abs(f[np.isfinite(f)]))) if np.isfinite(f).any() else 0.0 for f in flats)
        )
    return v if v > 0 else 1.0


def _offsets(sizes: Sequence[int]) -> list[int]:
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + int(s))
    return offs


def mean_pool(data: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor × factor`` tiles of ``data`` (edge tiles average only the entries they hold)."""
    f = int(factor)
    if f <= 1:
        return data
    n, m = data.shape
    pn, pm = -(-n // f) * f, -(-m // f) * f
    padded = np.zeros((pn, pm), dtype=data.dtype)
    padded[:n, :m] = data
    sums = padded.reshape(pn // f, f, pm // f, f).sum(axis=(1, 3))
    rows = np.minimum(f, n - np.arange(0, pn, f))
    cols = np.minimum(f, m - np.arange(0, pm, f))
    return sums / (rows[:, None] * cols[None, :])


class MatrixPanel:
    """One axes showing ``|M|`` in the paper layout: gray imshow, block-boundary lines, layer ticks.

    :meth:`show` creates the image on first use and afterwards only updates it (``set_data``,
    ``set_clim``, the extent when the size changes, and the block lines when the layer blocks change),
    so figures kept alive by the widgets are never rebuilt. ``data`` holds the |M| last shown.
    :meth:`add_colorbar` attaches a slim colourbar (0 to the white level, ticks at 0, vmax/2 and vmax)
    just right of the panel; ``colorbar`` is None until then.

    ``max_pixels`` (used by the widgets, where every redraw counts): when the matrix has at least twice
    as many rows as the panel has pixels, the image holds ``|M|`` mean-pooled over ``f × f`` tiles,
    ``f = n // max_pixels`` (what an antialiasing filter would show anyway, at a fraction of the
    rendering cost); ``data`` stays full-resolution. Without it (the figure functions) the image holds
    ``|M|`` itself.
    """

    def __init__(
        self,
        ax,
        title: str = "",
        *,
        line_color: str = BLOCK_LINE_COLOR,
        cmap: str = CMAP,
        interpolation: str = INTERPOLATION,
        max_pixels: int | None = None,
    ):
        self.ax = ax
        self.image = None
        self.data: np.ndarray | None = None
        self.pool = 1
        self.lines: list = []
        self.line_color = line_color
        self.cmap = cmap
        self.interpolation = interpolation
        self.max_pixels = max_pixels
        self._blocks: tuple | None = None
        self._extent: tuple | None = None
        self.colorbar = None
        self.vmax: float | None = None
        ax.set_title(title, fontsize=10)

    def set_title(self, title: str) -> None:
        self.ax.set_title(title, fontsize=10)

    def show(
        self,
        M,
        vmax: float,
        sizes: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        col_sizes: Sequence[int] | None = None,
        col_labels: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Display ``|M|`` with white level ``vmax``; ``sizes``/``labels`` give the layer blocks
        (rows; ``col_sizes``/``col_labels`` for the columns when they differ). Returns ``|M|``."""
        data = _numpy_abs(M)
        if not np.isfinite(data).all():
            raise ValueError("a matrix panel contains NaN or Inf; refusing to draw a NaN figure.")
        n_rows, n_cols = data.shape
        self.data = data
        f = 1
        if self.max_pixels and max(n_rows, n_cols) >= 2 * self.max_pixels:
            f = max(n_rows, n_cols) // int(self.max_pixels)
        shown = mean_pool(data, f) if f > 1 else data
        self.pool = f
        # the image covers the (padded) pooled tiles; the axes limits show exactly the matrix
        extent = (-0.5, shown.shape[1] * f - 0.5, shown.shape[0] * f - 0.5, -0.5)
        if self.image is None:
            self.image = self.ax.imshow(
                shown,
                cmap=self.cmap,
                vmin=0.0,
                vmax=vmax,
                interpolation=self.interpolation,
                extent=extent,
                aspect="equal",
            )
        else:
            self.image.set_data(shown)
            self.image.set_clim(0.0, vmax)
            if self._extent != extent:
                self.image.set_extent(extent)
        self._extent = extent
        self.vmax = float(vmax)
        if self.colorbar is not None:
            self._colorbar_ticks()
        self.ax.set_xlim(-0.5, n_cols - 0.5)
        self.ax.set_ylim(n_rows - 0.5, -0.5)
        col_sizes = sizes if col_sizes is None else col_sizes
        col_labels = labels if col_labels is None else col_labels
        blocks = (
            tuple(sizes or ()),
            tuple(labels or ()),
            tuple(col_sizes or ()),
            tuple(col_labels or ()),
            n_rows,
            n_cols,
        )
        if blocks != self._blocks:
            self._draw_blocks(sizes, labels, col_sizes, col_labels, n_rows, n_cols)
            self._blocks = blocks
        return data

    def add_colorbar(self):
        """A slim colourbar right of the panel (an inset of its axes, so it moves and hides with it).

        It runs from 0 (black) to the white level; ``extend="max"`` marks that larger entries saturate
        at white. Call after the first :meth:`show`. Returns the Colorbar.
        """
        if self.image is None:
            raise ValueError("show a matrix before adding its colourbar.")
        if self.colorbar is None:
            w_in = self.ax.get_position().width * self.ax.figure.get_size_inches()[0]
            cax = self.ax.inset_axes([1 + COLORBAR_PAD / w_in, 0.0, COLORBAR_WIDTH / w_in, 1.0])
            self.colorbar = self.ax.figure.colorbar(self.image, cax=cax, extend="max", extendfrac=0.03)
            cax.tick_params(labelsize=7, length=2, pad=1.5)
            self._colorbar_ticks()
        return self.colorbar

    def _colorbar_ticks(self) -> None:
        v = float(self.vmax)
        self.colorbar.set_ticks([0.0, v / 2, v], labels=["0", _fmt(v / 2), _fmt(v)])

    def _draw_blocks(self, sizes, labels, col_sizes, col_labels, n_rows, n_cols) -> None:
        for ln in self.lines:
            ln.remove()
        self.lines = []
        ax = self.ax
        for axis, sz, lab, _n in (("y", sizes, labels, n_rows), ("x", col_sizes, col_labels, n_cols)):
            set_ticks = ax.set_yticks if axis == "y" else ax.set_xticks
            if not sz:
                set_ticks([])
                set_ticks([], minor=True)
                continue
            offs = _offsets(sz)
            for o in offs[1:-1]:
                line = (ax.axhline if axis == "y" else ax.axvline)(
                    o - 0.5, color=self.line_color, lw=BLOCK_LINE_WIDTH, alpha=0.8
                )
                self.lines.append(line)
            set_ticks([o - 0.5 for o in offs], labels=[])
            centers = [(a + b) / 2 - 0.5 for a, b in itertools.pairwise(offs)]
            set_ticks(centers, labels=list(lab) if lab else [""] * len(centers), minor=True)
        ax.tick_params(which="minor", length=0, labelsize=8)
        ax.tick_params(which="major", length=3)


# Fixed panel geometry (inches). A hand-made layout instead of constrained layout: it costs nothing
# per draw (widgets redraw on every slider move) and lets a widget hide a row by shrinking the figure.
# With colourbars (the figure functions; the widgets go without) each panel's slim bar sits in the gap
# to its right, which widens to hold the bar and its tick labels.
_GEOM = {"left": 0.5, "right": 0.15, "wgap": 0.55, "title": 0.32, "ticks": 0.3, "suptitle": 0.6}
_GEOM_CBAR = {"wgap": 1.05, "right": 0.75}


def _grid_rects(
    n_rows: int, n_cols: int, panel_inches: float, colorbars: bool = False, extra_top: float = 0.0
) -> tuple[tuple[float, float], list[list[tuple]]]:
    """Figure size and axes rectangles (figure fractions) of an n_rows × n_cols grid of square panels.

    ``extra_top`` (inches) enlarges the band above the panels for a longer title."""
    g, p = {**_GEOM, **(_GEOM_CBAR if colorbars else {})}, float(panel_inches)
    g["suptitle"] += float(extra_top)
    width = g["left"] + n_cols * p + (n_cols - 1) * g["wgap"] + g["right"]
    row_h = g["title"] + p + g["ticks"]
    height = g["suptitle"] + n_rows * row_h
    rects = []
    for r in range(n_rows):
        bottom = height - g["suptitle"] - r * row_h - g["title"] - p
        rects.append(
            [
                ((g["left"] + c * (p + g["wgap"])) / width, bottom / height, p / width, p / height)
                for c in range(n_cols)
            ]
        )
    return (width, height), rects


def _panel_grid(
    n_rows: int, n_cols: int, panel_inches: float = 3.3, *, colorbars: bool = False, extra_top: float = 0.0
) -> tuple:
    """A Figure with an n_rows × n_cols grid of square axes (2-D array), fixed layout.

    ``colorbars=True`` leaves room right of every panel for :meth:`MatrixPanel.add_colorbar`;
    ``extra_top`` (inches) makes room for a title of more than two lines.
    """
    (w, h), rects = _grid_rects(n_rows, n_cols, panel_inches, colorbars, extra_top)
    fig = Figure(figsize=(w, h))
    axes = np.array([[fig.add_axes(rect) for rect in row] for row in rects], dtype=object)
    fig.kfac_geometry = (n_rows, n_cols, float(panel_inches), bool(colorbars), float(extra_top))
    return fig, axes


def _show_rows(fig: Figure, axes, n_visible: int) -> None:
    """Show only the first ``n_visible`` rows of a :func:`_panel_grid` figure, shrinking it to fit."""
    n_rows, n_cols, p, *rest = fig.kfac_geometry
    (w, h), rects = _grid_rects(n_visible, n_cols, p, *rest)
    fig.set_size_inches(w, h)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_visible(r < n_visible)
            if r < n_visible:
                ax.set_position(rects[r][c])


def _suptitle(fig: Figure, text: str) -> None:
    h = fig.get_size_inches()[1]
    fig.suptitle(text, fontsize=10, y=1 - 0.12 / h, va="top")


def _attach(fig: Figure, df: pd.DataFrame, **meta) -> None:
    fig.kfac_lens = dict(meta)  # figure metadata (vmax, gamma, ...) for callers and tests
    df.attrs.update(meta)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ============================================================================ the shared precomputation
def _spd_inverse(M: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix via Cholesky (``cholesky_inverse``)."""
    L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
    if int(info) != 0:
        raise SingularFactorError(
            f"{what} is not positive definite (Cholesky failed at column {int(info)}), so it cannot be "
            "inverted at this damping. Pass a larger gamma (factored Tikhonov damping, Appendix E.3)."
        )
    inv = torch.cholesky_inverse(L)
    return 0.5 * (inv + inv.T)


def block_mass(M: torch.Tensor, sizes: Sequence[int]) -> dict[str, float]:
    """Fractions of ``‖M‖_F²`` on the diagonal blocks, the two neighbouring block diagonals and beyond.

    ``within_tridiagonal`` = diagonal + neighbours; ``neighbour_share_of_off_diagonal`` is the part of
    the off-diagonal-block mass that sits on the neighbouring blocks (1 for an exactly block-tridiagonal
    matrix, whatever the size of its diagonal). ``blockdiag_truncation_error`` and
    ``tridiag_truncation_error`` are ``‖M − trunc(M)‖_F / ‖M‖_F`` when everything outside the diagonal
    (resp. tridiagonal) blocks is zeroed: how far M is from being block-diagonal / block-tridiagonal.
    """
    offs = _offsets(sizes)
    n = len(sizes)
    sq = M.detach().to(torch.float64) ** 2
    mass = {"diagonal": 0.0, "neighbour": 0.0, "off_tridiagonal": 0.0}
    for i in range(n):
        for j in range(n):
            v = float(sq[offs[i] : offs[i + 1], offs[j] : offs[j + 1]].sum())
            key = "diagonal" if i == j else ("neighbour" if abs(i - j) == 1 else "off_tridiagonal")
            mass[key] += v
    total = sum(mass.values())
    off = mass["neighbour"] + mass["off_tridiagonal"]
    # error of the best block-diagonal / block-tridiagonal truncation, relative to ‖M‖_F
    trunc = {
        "blockdiag_truncation_error": math.sqrt(off / total) if total else float("nan"),
        "tridiag_truncation_error": math.sqrt(mass["off_tridiagonal"] / total) if total else float("nan"),
    }
    return {
        **trunc,
        "diagonal_mass": mass["diagonal"] / total if total else float("nan"),
        "neighbour_mass": mass["neighbour"] / total if total else float("nan"),
        "within_tridiagonal_mass": (mass["diagonal"] + mass["neighbour"]) / total if total else float("nan"),
        "off_tridiagonal_mass": mass["off_tridiagonal"] / total if total else float("nan"),
        "neighbour_share_of_off_diagonal": mass["neighbour"] / off if off else float("nan"),
    }


class CurvatureStudy:
    """Everything the figures and widgets need about one network on one data set, computed once.

    Parameters: ``model`` (an ``nn.Sequential`` of Linear layers, see :class:`~kfac_lens.nets.NetworkView`),
    inputs ``X``, targets ``y`` (needed only for the gradient ∇h and the natural-gradient directions),
    ``likelihood`` ("categorical", "bernoulli", "gaussian"), ``layers`` (0-based Linear indices; the
    paper's Figures 5–6 use the middle four, ``[1, 2, 3, 4]``), ``pi`` (factored-Tikhonov π: "trace"
    or a number, Appendix E.6).

    The model is snapshotted (deep-copied to float64) so later training does not change the study.
    Precomputed: ``F`` (exact Fisher, dense float64), ``factors`` (exact-estimator Kronecker factors,
    ``pairs="all"``), ``F_tilde`` (F̃), ``grad`` (∇h in the paper layout, or None without y); an
    eigendecomposition of F is computed on first need. γ-dependent quantities are memoised per γ
    (the ``cache_size`` most recent values), so a widget's γ change recomputes only those.
    """

    def __init__(
        self,
        model,
        X,
        y=None,
        likelihood="categorical",
        layers=None,
        *,
        pi="trace",
        name: str | None = None,
        chunk_size: int | None = None,
        cache_size: int = 4,
    ):
        t0 = time.perf_counter()
        view = NetworkView(model)
        self.model = copy.deepcopy(view.model).to(torch.float64)
        self.view = NetworkView(self.model)
        self.layers = self.view.select(layers)
        self.likelihood = get_likelihood(likelihood)
        X = torch.as_tensor(X)
        self.X = X.to(device=self.view.device, dtype=torch.float64)
        self.y = None if y is None else torch.as_tensor(y).to(self.view.device)
        self.pi = pi
        self.name = name or f"{'-'.join(str(s) for s in self._arch())} net"
        self.cache_size = int(cache_size)
        self.F = exact_fisher(self.model, self.X, self.likelihood, layers=self.layers, chunk_size=chunk_size)
        self.factors = kronecker_factors(
            self.model, self.X, self.likelihood, layers=self.layers, pairs="all", chunk_size=chunk_size
        )
        self.F_tilde = self.factors.dense()
        self.grad = self._gradient() if self.y is not None else None
        self._init_caches()
        self.timings = {"precompute_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ construction helpers
    def _arch(self) -> list[int]:
        return [self.view.layers[0].d_in] + [lay.d_out for lay in self.view.layers]

    def _init_caches(self) -> None:
        self._gamma_cache: OrderedDict[float, dict] = OrderedDict()
        self._subsets: dict[tuple, CurvatureStudy] = {}
        self._cumulants: dict[tuple, CumulantTerms] = {}
        self._F_eig = None

    def _gradient(self) -> torch.Tensor:
        """∇h = ∇θ (1/N) Σ_n L(y_n, f(x_n, θ)) of the selected layers, paper layout (docs/math.md §1)."""
        mods = [self.view.layers[k].module for k in self.layers]
        params = []
        for m in mods:
            params.append(m.weight)
            if m.bias is not None:
                params.append(m.bias)
        with torch.enable_grad():
            z = self.model(self.X)
            y = self.likelihood.check_targets(
                z, self.y.to(z.dtype) if self.y.dtype.is_floating_point else self.y
            )
            h = self.likelihood.nll(z, y)
            grads = list(torch.autograd.grad(h, params))
        mats = []
        for m in mods:
            dw = grads.pop(0)
            if m.bias is not None:
                dw = torch.cat([dw, grads.pop(0)[:, None]], dim=1)
            mats.append(dw.detach())
        return mats_to_vec(mats)

    # ------------------------------------------------------------------ sizes and labels
    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [self.view.layers[k].shape for k in self.layers]

    @property
    def sizes(self) -> list[int]:
        return [r * c for r, c in self.shapes]

    @property
    def labels(self) -> list[str]:
        return [layer_label(k) for k in self.layers]

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def __repr__(self) -> str:
        return (
            f"CurvatureStudy({self.name!r}, layers={self.layers}, P={self.n_params}, N={self.X.shape[0]}, "
            f"likelihood={self.likelihood.name!r})"
        )

    # ------------------------------------------------------------------ layer subsets
    def subset(self, layers: Sequence[int]) -> CurvatureStudy:
        """The study restricted to ``layers`` (a strictly increasing subset), sharing F, factors and ∇h."""
        sel = self.factors.select(layers)
        if sel == self.layers:
            return self
        key = tuple(sel)
        if key not in self._subsets:
            sub = object.__new__(CurvatureStudy)
            sub.model, sub.view, sub.likelihood = self.model, self.view, self.likelihood
            sub.X, sub.y, sub.pi, sub.cache_size = self.X, self.y, self.pi, self.cache_size
            sub.layers = sel
            sub.name = f"{self.name} [{', '.join(layer_label(k) for k in sel)}]"
            slices = dict(zip(self.layers, self.view.block_slices(self.layers)))
            idx = torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in sel]).to(self.F.device)
            sub.F = self.F[idx][:, idx]
            keep = set(sel)
            fac = self.factors
            sub.factors = KroneckerFactors(
                {kl: t for kl, t in fac.A.blocks.items() if set(kl) <= keep},
                {kl: t for kl, t in fac.G.blocks.items() if set(kl) <= keep},
                sel,
                {k: fac.shapes[k] for k in sel},
                fac.n_cases,
                fac.estimator,
            )
            sub.F_tilde = self.F_tilde[idx][:, idx]
            sub.grad = None if self.grad is None else self.grad[idx]
            sub._init_caches()
            sub.timings = {"precompute_s": 0.0}
            self._subsets[key] = sub
        return self._subsets[key]

    # ------------------------------------------------------------------ γ memo
    def _memo(self, gamma: float, key: str, fn: Callable):
        g = float(gamma)
        slot = self._gamma_cache.get(g)
        if slot is None:
            slot = self._gamma_cache[g] = {}
            while len(self._gamma_cache) > self.cache_size:
                self._gamma_cache.popitem(last=False)
        else:
            self._gamma_cache.move_to_end(g)
        if key not in slot:
            slot[key] = fn()
        return slot[key]

    def damped_factors(self, gamma: float) -> KroneckerFactors:
        """Factors with factored Tikhonov damping γ on the diagonal factors (docs/math.md §4)."""
        return self._memo(gamma, "damped_factors", lambda: self.factors.damped(gamma, self.pi))

    def F_tilde_damped(self, gamma: float) -> torch.Tensor:
        """Damped F̃: F̃ with ``Ā_kk + πγI`` and ``G_kk + (γ/π)I`` on the diagonal blocks (γ = 0: F̃)."""
        if float(gamma) == 0.0:
            return self.F_tilde
        return self.damped_factors(gamma).dense()  # not memoised: cheap, and saves a P×P per cached γ

    def F_tilde_inverse(self, gamma: float) -> torch.Tensor:
        """F̃⁻¹ at damping γ: the exact inverse of the **damped** F̃ (Cholesky)."""
        return self._memo(
            gamma,
            "F_tilde_inverse",
            lambda: _spd_inverse(self.F_tilde_damped(gamma), f"damped F̃ (γ={float(gamma):g})"),
        )

    def blockdiag_operator(self, gamma: float) -> BlockDiagonalInverse:
        return self._memo(
            gamma, "blockdiag_op", lambda: BlockDiagonalInverse(self.factors, gamma, pi=self.pi)
        )

    def tridiag_operator(self, gamma: float) -> BlockTridiagonalInverse:
        return self._memo(
            gamma, "tridiag_op", lambda: BlockTridiagonalInverse(self.factors, gamma, pi=self.pi)
        )

    def blockdiag_inverse(self, gamma: float) -> torch.Tensor:
        """Dense F̆⁻¹ (block-diagonal inverse, Section 3.2) at damping γ."""
        return self._memo(gamma, "blockdiag_inverse", lambda: self.blockdiag_operator(gamma).dense())

    def tridiag_inverse(self, gamma: float) -> torch.Tensor:
        """Dense F̂⁻¹ (block-tridiagonal inverse, Section 3.3) at damping γ."""
        return self._memo(
            gamma, "tridiag_inverse", lambda: self.tridiag_operator(gamma).dense()
        )

    def blockdiag_approximation(self, gamma: float) -> torch.Tensor:
        """F̆: the diagonal blocks of the damped F̃."""

        def make():
            out = torch.zeros_like(self.F_tilde)
            D = self.F_tilde_damped(gamma)
            for sl in self.view.block_slices(self.layers):
                out[sl, sl] = D[sl, sl]
            return out

        return self._memo(gamma, "blockdiag_approx", make)

    def tridiag_approximation(self, gamma: float) -> torch.Tensor:
        """F̂ = (F̂⁻¹)⁻¹: equals the damped F̃ on the tridiagonal blocks."""
        return self._memo(
            gamma,
            "tridiag_approx",
            lambda: _spd_inverse(self.tridiag_inverse(gamma), f"F̂⁻¹ (γ={float(gamma):g})"),
        )

    # ------------------------------------------------------------------ natural-gradient directions
    def _eig_F(self):
        if self._F_eig is None:
            s, E = torch.linalg.eigh(self.F)
            self._F_eig = (s.clamp_min(0.0), E)
        return self._F_eig

    def exact_natural_gradient(self, gamma: float) -> torch.Tensor:
        """``(F + γ² I)⁻¹ ∇h``, the reference direction.

        Factored Tikhonov with strength γ stands in for adding ``(λ + η) I`` to the curvature: K-FAC
        initialises and keeps γ ≈ √(λ+η) (Appendix E.3, E.6), and for a single block
        ``(Ā + πγI) ⊗ (G + γ/π I) = Ā⊗G + πγ I⊗G + (γ/π) Ā⊗I + γ² I``, whose isotropic part is γ² I.
        So the exact-F direction at comparable damping is ``(F + γ² I)⁻¹∇h``. Uses a cached eigh of F.
        """
        self._need_grad()

        def make():
            s, E = self._eig_F()
            den = s + float(gamma) ** 2
            if float(den.min()) <= 0:
                raise SingularFactorError("F + γ²I is singular at γ = 0; pass gamma > 0.")
            return E @ ((E.T @ self.grad) / den)

        return self._memo(gamma, "exact_ng", make)

    def _need_grad(self) -> None:
        if self.grad is None:
            raise ValueError(
                "natural-gradient directions need the gradient ∇h: build the CurvatureStudy with y=."
            )

    def natural_gradients(self, gamma: float) -> dict[str, torch.Tensor]:
        """``{"F̆⁻¹∇h", "F̂⁻¹∇h", "F̃⁻¹∇h"}`` at damping γ (F̃⁻¹ of the damped F̃)."""
        self._need_grad()

        def make():
            g = self.grad
            return {
                "F̆⁻¹∇h": self.blockdiag_operator(gamma) @ g,
                "F̂⁻¹∇h": self.tridiag_operator(gamma) @ g,
                "F̃⁻¹∇h": self.F_tilde_inverse(gamma) @ g,
            }

        return self._memo(gamma, "natural_gradients", make)

    def direction_table(self, gamma: float) -> pd.DataFrame:
        """Cosine / relative error of each direction against ``(F + γ² I)⁻¹∇h``.

        See :meth:`exact_natural_gradient` for why γ².
        """
        return self._memo(
            gamma,
            "direction_table",
            lambda: direction_errors(
                self.natural_gradients(gamma),
                self.exact_natural_gradient(gamma),
                reference_name="(F+γ²I)⁻¹∇h",
            ),
        )

    # ------------------------------------------------------------------ error tables
    def inverse_errors(self, gamma: float) -> pd.DataFrame:
        """Relative Frobenius errors of F̆⁻¹ and F̂⁻¹ against F̃⁻¹ (damped), overall and by block kind."""

        def make():
            ref = self.F_tilde_inverse(gamma)
            df = pd.concat(
                [
                    error_by_kind(
                        self.blockdiag_inverse(gamma), ref, self.sizes, name="F̆⁻¹ (block-diagonal)"
                    ),
                    error_by_kind(
                        self.tridiag_inverse(gamma), ref, self.sizes, name="F̂⁻¹ (block-tridiagonal)"
                    ),
                ],
                ignore_index=True,
            )
            return df.assign(gamma=float(gamma))

        return self._memo(gamma, "inverse_errors", make)

    def damping_metrics(self, gamma: float) -> pd.DataFrame:
        """The DampingExplorer table, one row per inverse (F̆⁻¹, F̂⁻¹, F̃⁻¹) at damping γ.

        Columns: ``rel_error_overall`` / ``rel_error_diagonal`` (relative Frobenius error against F̃⁻¹,
        the inverse of the damped F̃, over all / the diagonal blocks); ``cosine_vs_exact_ng``: cosine of
        the direction (inverse)·∇h with the exact ``(F + γ²I)⁻¹∇h`` (see :meth:`exact_natural_gradient`);
        ``cosine_vs_F_tilde_ng``: cosine with ``F̃⁻¹∇h`` (isolates the error of the approximate inverse
        from that of F̃ and of the damping). Cosines are NaN without ``y``.
        """

        def make():
            err = self.inverse_errors(gamma).pivot(index="comparison", columns="kind", values="rel_error")
            names = {
                "F̆⁻¹ (block-diagonal)": "F̆⁻¹∇h",
                "F̂⁻¹ (block-tridiagonal)": "F̂⁻¹∇h",
                "F̃⁻¹ (damped F̃, exact inverse)": "F̃⁻¹∇h",
            }
            cos = cos_t = None
            if self.grad is not None:
                cos = self.direction_table(gamma).set_index("direction")["cosine"]
                dirs = self.natural_gradients(gamma)
                cos_t = direction_errors(dirs, dirs["F̃⁻¹∇h"]).set_index("direction")["cosine"]
            rows = []
            for inv_name, dir_name in names.items():
                row = {
                    "inverse": inv_name,
                    "gamma": float(gamma),
                    "rel_error_overall": float(err.loc[inv_name, "overall"])
                    if inv_name in err.index
                    else 0.0,
                    "rel_error_diagonal": float(err.loc[inv_name, "diagonal"])
                    if inv_name in err.index
                    else 0.0,
                }
                row["cosine_vs_exact_ng"] = float(cos[dir_name]) if cos is not None else float("nan")
                row["cosine_vs_F_tilde_ng"] = float(cos_t[dir_name]) if cos_t is not None else float("nan")
                rows.append(row)
            return pd.DataFrame(rows).set_index("inverse")

        return self._memo(gamma, "damping_metrics", make)

    # ------------------------------------------------------------------ Appendix B
    def cumulants(self, k: int, l: int, **kw) -> CumulantTerms:
        """The Appendix B terms of block (k, l) (cached); ``kw`` goes to :func:`~kfac_lens.cumulant_terms`."""
        key = (int(k), int(l), tuple(sorted(kw.items())))
        if key not in self._cumulants:
            self._cumulants[key] = cumulant_terms(
                self.model, self.X, self.likelihood, int(k), int(l), y=self.y, **kw
            )
        return self._cumulants[key]

    def default_small_gamma(self) -> float:
        """A γ too small to change the picture (1e-6 of the smallest per-layer factor scale √(mĀ·mG))."""
        scales = []
        for k in self.layers:
            A, G = self.factors.A[k, k], self.factors.G[k, k]
            scales.append(
                math.sqrt(
                    max(float(torch.trace(A)) / A.shape[0], 0.0)
                    * max(float(torch.trace(G)) / G.shape[0], 0.0)
                )
            )
        s = min(v for v in scales if v > 0) if any(v > 0 for v in scales) else 1.0
        return 1e-6 * s


# ============================================================================ Figures 5 and 6 (Appendix C)
def _comparison_figure(
    rows: list[tuple[str, torch.Tensor, str, torch.Tensor, str]],
    sizes,
    labels,
    suptitle: str,
    vmax: float | None,
    *,
    extra_cols: int = 0,
    level_note: str = "shared by all panels",
):
    """n×3 grid: reference | approximation | |difference| per row, one shared vmax, a colourbar each.

    ``extra_cols`` adds empty columns on the right (Figure 5's zoom). Returns ``(fig, vmax, axes)``.
    """
    diffs = [(ref - approx) for _, ref, _, approx, _ in rows]
    if vmax is None:
        vmax = shared_vmax(diffs)
        if not any(bool((d != 0).any()) for d in diffs):  # nothing to show in the differences
            vmax = shared_vmax([m for _, ref, _, approx, _ in rows for m in (ref, approx)])
    vmax = float(vmax)
    fig, axes = _panel_grid(len(rows), 3 + int(extra_cols), panel_inches=3.0, colorbars=True)
    panels = []
    for r, ((t_ref, ref, t_app, approx, t_diff), d) in enumerate(zip(rows, diffs)):
        for c, (title, M) in enumerate(((t_ref, ref), (t_app, approx), (t_diff, d))):
            p = MatrixPanel(axes[r, c], title)
            p.show(M, vmax, sizes, labels)
            p.add_colorbar()
            panels.append(p)
    _suptitle(fig, f"{suptitle}\nabsolute values; white level {_fmt(vmax)} {level_note}")
    fig.kfac_panels = panels
    fig.kfac_matrix_panels = list(panels)
    return fig, vmax, axes


def _off_tridiagonal_mask(sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Boolean P×P mask of the blocks (i, j) with |i − j| ≥ 2."""
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor([int(s) for s in sizes]))
    idx = idx.to(like.device)
    return (idx[:, None] - idx[None, :]).abs() >= 2


def _figure5_gamma(study: CurvatureStudy, gamma: float | None) -> tuple[float, bool]:
    """γ for Figure 5: 0 (undamped, as in the paper) unless the factors are singular there."""
    if gamma is not None:
        return float(gamma), False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            study.tridiag_approximation(0.0)
            study.blockdiag_operator(0.0)
        return 0.0, False
    except (SingularFactorError, RuntimeWarning, torch.linalg.LinAlgError):
        study._gamma_cache.pop(0.0, None)
        return study.default_small_gamma(), True


def figure5(study: CurvatureStudy, gamma: float | None = None, *, vmax: float | None = None):
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

    DataFrame: :func:`~kfac_lens.block_errors` of F̆ and F̂ against F̃ (per block and overall) with
    ``exact_by_construction`` (the blocks an approximation reproduces by definition: diagonal for F̆,
    tridiagonal for F̂), ``reproduced`` (``rel_error < 1e-6``; must be True where exact by
    construction), ``gamma``, ``vmax`` and ``zoom_vmax``.
    """
    g, fallback = _figure5_gamma(study, gamma)
    ref = study.F_tilde_damped(g)
    breve = study.blockdiag_approximation(g)
    hat = study.tridiag_approximation(g)
    tref = r"$\tilde F$" if g == 0 else r"$\tilde F$ (damped)"
    rows = [
        (tref, ref, r"$\breve F$ (block-diagonal inverse)", breve, r"$|\tilde F - \breve F|$"),
        (tref, ref, r"$\hat F$ (block-tridiagonal inverse)", hat, r"$|\tilde F - \hat F|$"),
    ]
    if g == 0:
        damp = "undamped (γ = 0)"
    else:
        damp = f"γ = {_fmt(g)}" + (" — tiny fallback: factors singular at γ = 0" if fallback else "")
    title = (
        f"Figure 5: $\\tilde F$ vs $\\breve F$ (top) and $\\hat F$ (bottom), {study.name}, "
        f"layers {study.labels[0]}–{study.labels[-1]}, P = {study.n_params}, {damp}"
    )
    diff = ref - hat
    mask = _off_tridiagonal_mask(study.sizes, diff)
    has_off = bool(mask.any())
    zoom_vmax = shared_vmax([diff[mask]]) if has_off else shared_vmax([diff])
    fig, used_vmax, axes = _comparison_figure(
        rows, study.sizes, study.labels, title, vmax, extra_cols=1,
        level_note=f"shared by the six left panels; the bottom-right zoom has its own ({_fmt(zoom_vmax)})",
    )
    zoom = MatrixPanel(
        axes[1, 3],
        (r"off-tridiag. $|\tilde F - \hat F|$" if has_off else r"$|\tilde F - \hat F|$")
        + f", white = {_fmt(zoom_vmax)}",
    )
    zoom.show(diff, zoom_vmax, study.sizes, study.labels)
    zoom.add_colorbar()
    fig.kfac_zoom_panel = zoom
    fig.kfac_matrix_panels.append(zoom)
    parts = []
    for name, approx, exact_pred in (
        ("F̆ (block-diagonal)", breve, lambda kind: kind == "diagonal"),
        ("F̂ (block-tridiagonal)", hat, lambda kind: kind in ("diagonal", "tridiagonal")),
    ):
        df = block_errors(approx, ref, study.sizes, labels=study.labels, name=name)
        df["exact_by_construction"] = [bool(exact_pred(kd)) and kd != "overall" for kd in df["kind"]]
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df["reproduced"] = df["rel_error"] < 1e-6
    df["gamma"] = g
    df["vmax"] = used_vmax
    df["zoom_vmax"] = zoom_vmax
    _figure5_notes(axes[0, 3], df, diff, ref, mask, used_vmax, zoom_vmax)
    _attach(fig, df, figure="figure5", vmax=used_vmax, zoom_vmax=zoom_vmax, gamma=g, gamma_fallback=fallback,
            layers=study.layers)
    return fig, df


def _figure5_notes(ax, df, diff, ref, mask, vmax: float, zoom_vmax: float) -> None:
    """The text beside Figure 5's zoom: F̂'s relative error on each off-tridiagonal block (from ``df``)."""
    ax.set_axis_off()
    hat = df[df["comparison"].str.startswith("F̂") & (df["kind"] == "off-tridiagonal")]
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
    lines += ["", f"Zoom below: white = {_fmt(zoom_vmax)},",
              f"{vmax / zoom_vmax:.3g}× finer than the shared {_fmt(vmax)}."]
    ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            linespacing=1.35)


def figure6(study: CurvatureStudy, gamma: float, *, vmax: float | None = None):
    """Appendix C, Figure 6: F̃⁻¹ vs F̆⁻¹ (top row) and F̂⁻¹ (bottom row), with absolute differences.

    All three inverses use factored Tikhonov damping with strength ``gamma`` (Appendices E.3, E.6; the
    paper used the γ that K-FAC held at that iteration). **F̃⁻¹ here is the inverse of the damped F̃**
    (docs/math.md §4: the diagonal factors Ā_kk + πγI, G_kk + (γ/π)I, cross factors undamped), the matrix
    whose tridiagonal blocks F̂ reproduces; F̆⁻¹ and F̂⁻¹ are built from the same damped factors.

    DataFrame: relative Frobenius errors of F̆⁻¹ and F̂⁻¹ against F̃⁻¹, overall and per block kind
    (:func:`~kfac_lens.error_by_kind`), with ``gamma`` and ``vmax``. The paper's claim: F̂⁻¹ is the
    better approximation, even on the diagonal blocks.
    """
    g = float(gamma)
    ref = study.F_tilde_inverse(g)
    rows = [
        (
            r"$\tilde F^{-1}$",
            ref,
            r"$\breve F^{-1}$ (block-diagonal)",
            study.blockdiag_inverse(g),
            r"$|\tilde F^{-1} - \breve F^{-1}|$",
        ),
        (
            r"$\tilde F^{-1}$",
            ref,
            r"$\hat F^{-1}$ (block-tridiagonal)",
            study.tridiag_inverse(g),
            r"$|\tilde F^{-1} - \hat F^{-1}|$",
        ),
    ]
    title = (
        f"Figure 6: $\\tilde F^{{-1}}$ vs $\\breve F^{{-1}}$ (top) and $\\hat F^{{-1}}$ (bottom), "
        f"{study.name}, layers {study.labels[0]}–{study.labels[-1]}, factored Tikhonov γ = {_fmt(g)}"
    )
    fig, used_vmax, _axes = _comparison_figure(rows, study.sizes, study.labels, title, vmax)
    df = study.inverse_errors(g).copy()
    df["vmax"] = used_vmax
    _attach(fig, df, figure="figure6", vmax=used_vmax, gamma=g, layers=study.layers)
    return fig, df


# ============================================================================ Figure 7 (Appendix E.4)
FIGURE7_STYLES = {
    "re-scaled, momentum": dict(color="tab:blue", marker="o"),
    "re-scaled, no momentum": dict(color="tab:green", marker="s"),
    "raw Δ (no re-scaling)": dict(color="tab:red", marker="^"),
}


def figure7_gammas(chosen: float, below: float = 4.0, above: float = 2.0, points: int = 13) -> np.ndarray:
    """A log grid of γ around the value K-FAC chose: ``below`` decades under it, ``above`` over it."""
    c = math.log10(chosen)
    return np.logspace(c - below, c + above, points)


def figure7_data(optimizer, X, y, gammas=None, *, lam=None, progress=False, cache=None,
                 variants=None, dtype="auto") -> pd.DataFrame:
    """The improvement h(θ) − h(θ+δ) against γ for the update variants (KFAC.gamma_sweep).

    K-FAC refuses to invert damped factors that are too ill-conditioned for its dtype
    (:class:`~kfac_lens.SingularFactorError`); in float32 that happens at the small γ of Figure 7's grid.
    ``dtype``:

    - ``"auto"`` (default): the optimizer's own dtype; if K-FAC refuses some γ there, the whole sweep
      is redone in float64 on a copy of the optimizer and its model (same state, same data), so every
      γ gets a value from one consistent computation;
    - ``None``: the optimizer's dtype only; a refused γ is kept as rows with NaN ``improvement``, ``M``,
      ``alpha``, ``mu`` and the reason in a ``refused`` column (present only then);
    - a torch dtype: the sweep in that dtype (on a copy when it differs), refused γ as for ``None``.

    The ``dtype`` column names the dtype the values were computed in. ``cache`` as in
    ``KFAC.gamma_sweep`` (the float64 copy and its own cache are kept in it too).
    """
    gammas = figure7_gammas(optimizer.gamma) if gammas is None else np.asarray(gammas, dtype=float)
    cache = {} if cache is None else cache
    kw = dict(lam=lam, variants=variants, progress=progress)
    own = optimizer.view.dtype
    if dtype == "auto":
        target = torch.float64 if cache.get("figure7_auto_dtype") == torch.float64 else own
        try:
            df = _figure7_sweep(optimizer, X, y, gammas, target, cache, kw, per_gamma=False)
        except SingularFactorError:
            if target == torch.float64:
                df = _figure7_sweep(optimizer, X, y, gammas, target, cache, kw, per_gamma=True)
            else:
                cache["figure7_auto_dtype"] = target = torch.float64
                df = _figure7_sweep(optimizer, X, y, gammas, target, cache, kw, per_gamma=True)
    else:
        target = own if dtype is None else dtype
        df = _figure7_sweep(optimizer, X, y, gammas, target, cache, kw, per_gamma=True)
    return df.assign(figure="7", chosen_gamma=optimizer.gamma,
                     lam=optimizer.lam if lam is None else float(lam),
                     dtype=str(target).removeprefix("torch."))


def _figure7_sweep(optimizer, X, y, gammas, dtype, cache: dict, kw: dict, per_gamma: bool) -> pd.DataFrame:
    """One gamma_sweep in ``dtype``; ``per_gamma``: on a refusal go γ by γ and keep NaN rows for refused γ."""
    if dtype != optimizer.view.dtype:
        key = ("figure7 copy", str(dtype))
        if key not in cache:
            cache[key] = {"optimizer": _optimizer_copy(optimizer, dtype), "cache": {}}
        opt, cache = cache[key]["optimizer"], cache[key]["cache"]
        X = torch.as_tensor(X).to(dtype)
        y = torch.as_tensor(y)
        y = y.to(dtype) if y.is_floating_point() else y
    else:
        opt = optimizer
    try:
        return opt.gamma_sweep(X, y, gammas, cache=cache, **kw)
    except SingularFactorError:
        if not per_gamma:
            raise
    if "eigs" not in cache:  # as the one-call sweep would share it
        cache["eigs"] = opt._shared_eigs(len(gammas))
    names = list(opt.VARIANTS) if kw.get("variants") is None else list(kw["variants"])
    parts = []
    for g in gammas:
        try:
            parts.append(opt.gamma_sweep(X, y, [float(g)], cache=cache, **{**kw, "progress": False}))
        except SingularFactorError as exc:
            parts.append(pd.DataFrame({"gamma": float(g), "variant": names, "improvement": np.nan,
                                       "M": np.nan, "alpha": np.nan, "mu": np.nan,
                                       "refused": str(exc).split(":")[0]}))
    return pd.concat(parts, ignore_index=True)


def _optimizer_copy(optimizer, dtype: torch.dtype):
    """A copy of a K-FAC optimizer and its model in ``dtype``, with the same state (factors, λ, γ, δ₀)."""
    memo = {id(optimizer.generator): torch.Generator(device=optimizer.view.device)}  # not deep-copyable
    opt = copy.deepcopy(optimizer, memo)
    opt.model.to(dtype)
    opt.load_state_dict(optimizer.state_dict())  # casts the factors, δ₀ and the inverse to the new dtype
    return opt


def figure7_linthresh(df: pd.DataFrame) -> float:
    """The symlog linear threshold of Figure 7's y axis, taken from the data.

    The smallest positive improvement of the re-scaled curves (or of any curve when they have none),
    so every positive value of those curves lies on the logarithmic part and none is flattened into
    the linear band around 0; 1 when no improvement is positive.
    """
    imp = df["improvement"].astype(float)
    rescaled = df["variant"].astype(str).str.startswith("re-scaled")
    for sel in (rescaled, np.ones(len(df), dtype=bool)):
        pos = imp[sel & (imp > 0) & np.isfinite(imp)]
        if len(pos):
            return float(pos.min())
    return 1.0


def _symlog_ticks(values, linthresh: float) -> list[float]:
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
    variants = list(FIGURE7_STYLES) if variants is None else list(variants)
    lines = {}
    shown = []
    for name in variants:
        d = df[df["variant"] == name].sort_values("gamma")
        if d.empty:
            continue
        st = FIGURE7_STYLES.get(name, {})
        (lines[name],) = ax.plot(d["gamma"].to_numpy(), d["improvement"].to_numpy(dtype=float), label=name,
                                 color=st.get("color"), marker=st.get("marker"), ms=4, lw=1.5)
        shown.append(d)
    linthresh = figure7_linthresh(pd.concat(shown) if shown else df)
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    ax.yaxis.set_major_locator(FixedLocator(_symlog_ticks(df["improvement"], linthresh)))
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
    ax.kfac_linthresh = linthresh
    return lines


def figure7(optimizer, X, y, gammas=None, *, lam=None, title=None, progress=False, dtype="auto"):
    """Figure 7: the improvement h(θ) − h(θ+δ) against γ for the re-scaled update with and without K-FAC
    momentum and the raw Δ (Appendix E.4), on the network and data the optimizer is at (e.g. the zoo
    autoencoder at its captured iteration). Symlog y axis, every point at its value (the raw Δ can
    make h worse by millions while the re-scaled updates gain fractions); the star marks the γ K-FAC
    chose; the legend is outside the axes. ``dtype`` as in :func:`figure7_data` (by default a float32
    optimizer whose factors are too ill-conditioned at small γ is evaluated in float64, and the title
    says so). Returns (Figure, DataFrame)."""
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
    return fig, df


# ============================================================================ companions (main text)
def figure_exact_vs_kfac(study: CurvatureStudy, *, vmax: float | None = None):
    """Exact F, F̃ and |F − F̃| side by side (the main text's Figure 2), one shared white level.

    The white level is in the figure's title and each panel has a slim colourbar.
    DataFrame: :func:`~kfac_lens.block_errors` of F̃ against F (overall and per block), with ``vmax``.
    """
    F, Ft = study.F, study.F_tilde
    mats = [F, Ft, F - Ft]
    vmax = shared_vmax(mats) if vmax is None else float(vmax)
    fig, axes = _panel_grid(1, 3, colorbars=True)
    panels = []
    for ax, title, M in zip(axes[0], (r"exact $F$", r"$\tilde F$ (K-FAC)", r"$|F - \tilde F|$"), mats):
        p = MatrixPanel(ax, title)
        p.show(M, vmax, study.sizes, study.labels)
        p.add_colorbar()
        panels.append(p)
    _suptitle(
        fig,
        f"Exact Fisher vs its Kronecker-factored approximation, {study.name}, "
        f"layers {study.labels[0]}–{study.labels[-1]} (P = {study.n_params})\n"
        f"absolute values; white level {_fmt(vmax)} shared by all panels",
    )
    fig.kfac_panels = panels
    fig.kfac_matrix_panels = list(panels)
    df = block_errors(Ft, F, study.sizes, labels=study.labels, name="F̃ vs F")
    df["vmax"] = vmax
    _attach(fig, df, figure="exact_vs_kfac", vmax=vmax, layers=study.layers)
    return fig, df


def neighbour_share_chance(sizes: Sequence[int]) -> float:
    """The neighbour share of the off-diagonal-block mass a matrix with evenly spread mass would have.

    That is the fraction of the off-diagonal-block *entries* that lie on the neighbouring blocks
    (Σ_{|i−j|=1} s_i s_j / Σ_{i≠j} s_i s_j): 0.5 for four equal blocks, 1 for two. A
    ``neighbour_share_of_off_diagonal`` (:func:`block_mass`) near this level says nothing about
    tridiagonal structure. NaN for a single block.
    """
    s = [float(v) for v in sizes]
    n = len(s)
    near = sum(s[i] * s[j] for i in range(n) for j in range(n) if abs(i - j) == 1)
    off = sum(s[i] * s[j] for i in range(n) for j in range(n) if i != j)
    return near / off if off else float("nan")


def figure_inverse_structure(study: CurvatureStudy, gamma: float):
    """F̃ beside F̃⁻¹ (the main text's Figure 3), titled with how block-tridiagonal the inverse is.

    F̃⁻¹ is the inverse of the damped F̃ at ``gamma``. Exception to the shared white level, as in the
    paper's Figure 3: F̃ and its inverse differ in scale by orders of magnitude, so each panel has its
    own vmax (the ``vmax`` column, in the panel's title and on its colourbar): the 99.5th percentile
    of |F̃|, and for F̃⁻¹ that of its *off-diagonal blocks*, so that its strong diagonal blocks
    saturate and the contrast between the neighbouring blocks and those beyond them shows.

    The title states, computed from the matrices, the share of ‖F̃⁻¹‖_F² in the diagonal blocks and
    the share of the rest that sits on the neighbouring blocks, next to its chance level
    (:func:`neighbour_share_chance`) and to the same share for F̃ itself. How block-tridiagonal F̃⁻¹
    looks depends strongly on γ: heavy damping makes it nearly block-diagonal.

    DataFrame (one row per matrix: F̃, damped F̃, F̃⁻¹): fractions of the squared Frobenius mass on the
    diagonal blocks, the neighbouring blocks and beyond (:func:`block_mass`), and
    ``neighbour_share_chance``.
    """
    g = float(gamma)
    Ft, Fd, Finv = study.F_tilde, study.F_tilde_damped(g), study.F_tilde_inverse(g)
    fig, axes = _panel_grid(1, 2, panel_inches=4.0, colorbars=True, extra_top=0.3)  # a 3-line title
    panels, vmaxes = [], []
    for ax, title, M in zip(
        axes[0], (r"$\tilde F$", rf"$\tilde F^{{-1}}$ (damped, γ = {_fmt(g)})"), (Ft, Finv)
    ):
        if M is Finv:
            offs = _offsets(study.sizes)
            blocks = [M[offs[i]:offs[i + 1], offs[j]:offs[j + 1]].reshape(-1)
                      for i in range(len(study.sizes)) for j in range(len(study.sizes)) if i != j]
            v = shared_vmax([torch.cat(blocks)]) if blocks else shared_vmax([M])
        else:
            v = shared_vmax([M])
        p = MatrixPanel(ax, title + f", white = {_fmt(v)}")
        p.show(M, v, study.sizes, study.labels)
        p.add_colorbar()
        panels.append(p)
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
    _suptitle(fig, inverse_structure_title(study.name, g, df))
    fig.kfac_panels = panels
    fig.kfac_matrix_panels = list(panels)
    _attach(fig, df, figure="inverse_structure", vmax=tuple(vmaxes), gamma=g, layers=study.layers)
    return fig, df


def inverse_structure_title(name: str, gamma: float, df: pd.DataFrame) -> str:
    """The title of :func:`figure_inverse_structure`, from its DataFrame's numbers."""
    ft, inv = df.iloc[0], df.iloc[-1]
    chance = float(inv["neighbour_share_chance"])
    return (
        f"$\\tilde F$ and the inverse of the damped $\\tilde F$ (γ = {_fmt(gamma)}), {name}\n"
        f"$\\tilde F^{{-1}}$: {_pct(inv['diagonal_mass'])} of its squared mass is in the diagonal blocks; "
        f"of the remaining {_pct(1 - inv['diagonal_mass'])}, {_pct(inv['neighbour_share_of_off_diagonal'])} "
        f"is on the neighbouring blocks\n"
        f"(chance level, by entry count: {_pct(chance)}; "
        f"$\\tilde F$ itself: {_pct(ft['neighbour_share_of_off_diagonal'])} of its "
        f"{_pct(1 - ft['diagonal_mass'])} off-diagonal mass)"
    )


def _pct(x: float) -> str:
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


def cumulant_figure(panel_inches: float = 3.0, *, colorbars: bool = False) -> tuple[Figure, list[MatrixPanel]]:
    """An empty 1×5 figure for the Appendix B panels (fill it with :func:`draw_cumulants`, which adds a
    colourbar to each panel when ``colorbars``; :func:`figure_cumulants` asks for them)."""
    fig, axes = _panel_grid(1, len(CUMULANT_PANELS), panel_inches=panel_inches, colorbars=colorbars)
    return fig, [MatrixPanel(ax, title) for ax, (_, title) in zip(axes[0], CUMULANT_PANELS)]


def draw_cumulants(
    fig: Figure, panels: Sequence[MatrixPanel], terms: CumulantTerms, vmax: float | None = None
) -> float:
    """Show the Appendix B terms of ``terms`` on the panels of :func:`cumulant_figure` (in place).

    Shared white level: the 99.5th percentile of |entries| pooled over the five panels. Returns it.
    """
    mats = [terms.as_block(name) for name, _ in CUMULANT_PANELS]
    vmax = shared_vmax(mats) if vmax is None else float(vmax)
    k, l = terms.k, terms.l
    colorbars = len(getattr(fig, "kfac_geometry", ())) > 3 and fig.kfac_geometry[3]
    for p, M in zip(panels, mats):
        p.show(M, vmax)
        if colorbars:
            p.add_colorbar()
        p.ax.set_xlabel(f"{layer_label(l)}: (ā index, g index)", fontsize=8)
    panels[0].ax.set_ylabel(f"{layer_label(k)}: (ā index, g index)", fontsize=8)
    note = "exact over y" if terms.exact else f"estimator {terms.estimator!r}: the identity need not hold"
    _suptitle(
        fig,
        f"Appendix B: block ({layer_label(k)}, {layer_label(l)}) of $F - \\tilde F$ = sum of three "
        f"cumulant terms ({note}); white = {_fmt(vmax)}",
    )
    fig.kfac_panels = list(panels)
    fig.kfac_matrix_panels = list(panels)
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
):
    """Block (k, l) of F − F̃ beside each Appendix B term and the residual (docs/math.md §6).

    Panels: ``F − F̃`` | ``κ(ā₁,g₁,ā₂,g₂)`` | ``κ(ā₁)κ(ā₂,g₁,g₂)`` | ``κ(ā₂)κ(ā₁,g₁,g₂)`` | residual,
    absolute values, shared white level; rows are (ā_k index, g_k index) = ``k1·d_k + k2`` as in the
    paper layout. ``model`` may also be a :class:`CurvatureStudy` (then X and likelihood are ignored and
    its cached terms are used). ``terms`` skips the computation. ``kw`` goes to
    :func:`~kfac_lens.cumulant_terms` (``samples``, ``seed`` for sampled estimators).

    DataFrame: :meth:`CumulantTerms.summary` (Frobenius norm of each term and relative to ‖F − F̃‖),
    with ``vmax``.
    """
    if terms is None:
        if isinstance(model, CurvatureStudy):
            terms = model.cumulants(k, l, estimator=estimator, **kw)
        else:
            terms = cumulant_terms(model, X, likelihood, k, l, estimator=estimator, y=y, **kw)
    fig, panels = cumulant_figure(colorbars=True)
    used = draw_cumulants(fig, panels, terms, vmax)
    df = terms.summary()
    df["vmax"] = used
    _attach(fig, df, figure="cumulants", vmax=used, block=(terms.k, terms.l))
    return fig, df


# ============================================================================ training curves
TRAINING_ERROR_DEFINITIONS = {
    # what kfac_lens.optim.train's `evaluate` records as "error" for each likelihood
    "bernoulli": ("squared reconstruction error per case", r"$\sum_i (\sigma(z_i) - y_i)^2$, mean over cases"),
    "gaussian": ("squared error per case", r"$\sum_i (z_i - y_i)^2$, mean over cases"),
    "categorical": ("classification error rate", "fraction of cases with argmax z ≠ y"),
}
TRAINING_LOSS_DEFINITION = "mean negative log-likelihood per case on the iteration's mini-batch, before the update"


def figure_training_curves(
    histories: Mapping[str, pd.DataFrame],
    *,
    title: str | None = None,
    network: str | None = None,
    data: str | None = None,
    preset: str | None = None,
    likelihood: str | None = None,
):
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

    The title names ``network``, ``data`` and ``preset`` when given (``title`` replaces its first line).
    DataFrame: all histories stacked with a ``run`` column (and ``cases_processed`` where defined).
    """
    if not histories:
        raise ValueError("figure_training_curves needs at least one history DataFrame.")
    for name, h in histories.items():
        missing = {"iteration", "time", "loss"} - set(h.columns)
        if missing:
            raise ValueError(
                f"history {name!r} lacks column(s) {sorted(missing)}; "
                "need iteration, time (seconds), loss and optionally error and batch_size."
            )
    histories = {
        name: (h.assign(cases_processed=h["batch_size"].astype(float).cumsum()) if "batch_size" in h.columns else h)
        for name, h in histories.items()
    }
    has_error = any("error" in h.columns and h["error"].notna().any() for h in histories.values())
    has_cases = any("cases_processed" in h.columns for h in histories.values())
    xaxes = [("iteration", "iteration")]
    if has_cases:
        xaxes.append(("cases_processed", "training cases processed\n(cumulative mini-batch sizes)"))
    xaxes.append(("time", "optimizer time (s)"))
    n_rows, n_cols = (2 if has_error else 1), len(xaxes)
    lik = None if likelihood is None else str(likelihood).lower()
    err_short, err_formula = TRAINING_ERROR_DEFINITIONS.get(lik, ("error as recorded in the history", ""))
    ylabels = {
        "loss": "training loss\n(mini-batch NLL per case)",
        "error": f"training-set error\n({err_short})",
    }
    fig = Figure(figsize=(4.6 * n_cols, 3.6 * n_rows + 0.5), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, col in enumerate(["loss", "error"][:n_rows]):
        for c, (xcol, xlabel) in enumerate(xaxes):
            ax = axes[r, c]
            for name, h in histories.items():
                if col in h.columns and xcol in h.columns:
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
    head = title
    if head is None:
        what = ", ".join(x for x in (
            network,
            f"{data} training set" if data else None,
            f"preset {preset!r}" if preset else None,
        ) if x)
        head = "Training curves" + (f": {what}" if what else "")
    lines = [head, f"loss: {TRAINING_LOSS_DEFINITION}"]
    if has_error:
        lines.append(f"error: {err_short}" + (f" = {err_formula}" if err_formula else "")
                     + ", on the whole training set every few iterations")
    fig.suptitle("\n".join(lines), fontsize=10)
    df = pd.concat([h.assign(run=name) for name, h in histories.items()], ignore_index=True)
    _attach(fig, df, figure="training_curves", error_definition=(err_short, err_formula) if has_error else None)
    return fig, df


def training_comparison_labels(preset: str, data: str) -> dict:
    """Keyword arguments of :func:`figure_training_curves` that name what
    :func:`kfac_lens.zoo.training_comparison` trains: the deep autoencoder of ``preset`` (its layer
    widths as that function picks them), the data and the Bernoulli likelihood (its error is the
    squared reconstruction error per case)."""
    from .zoo import AUTOENCODER_PRESETS

    p = AUTOENCODER_PRESETS[preset]
    sizes = [64, 48, 24, 8, 24, 48, 64] if data == "digits" else p["sizes"]  # as zoo.training_comparison
    what = "8×8 digits" if data == "digits" else f"{str(data).upper()} ({p['n_train']} cases)"
    return dict(network=f"autoencoder {'-'.join(str(v) for v in sizes)}", data=what, preset=preset,
                likelihood="bernoulli")


# ============================================================================ saving
def save_figure(fig: Figure, path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG (or the format the suffix names) at ``dpi``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
