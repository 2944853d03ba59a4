"""The paper's figures, one function per figure, each returning ``(Figure, DataFrame)``.

Martens & Grosse (2015), Appendix C (Figures 5 and 6) and companions of the main text's Figures 2
and 3; MATH.md §9 fixes the display convention, which every matrix panel here follows:

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
  does. The value is in the DataFrame's ``vmax`` column, ``df.attrs["vmax"]``, ``fig.kfac_lens["vmax"]``
  and the figure's title;
- **block boundaries** as thin coloured lines at the layer-block edges, with ticks at the edges and
  each block labelled by its layer in the paper's 1-based naming (0-based layer k is ``W{k+1}``, so
  the example network's middle layers ``[1, 2, 3, 4]`` are W2..W5);
- the paper's parameter layout (MATH.md §1) for every matrix.

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
    "draw_figure7",
    "figure_cumulants",
    "figure_exact_vs_kfac",
    "figure_inverse_structure",
    "figure_training_curves",
    "layer_label",
    "mean_pool",
    "save_figure",
    "shared_vmax",
]

VMAX_QUANTILE = 99.5  # percentile of |entries| used as the shared white level
DEFAULT_DPI = 130  # save_figure's resolution
CMAP = "gray"  # 0 is black, large is white (Appendix C)
BLOCK_LINE_COLOR = "tab:red"  # layer-block boundaries
BLOCK_LINE_WIDTH = 0.6
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
_GEOM = {"left": 0.5, "right": 0.15, "wgap": 0.55, "title": 0.32, "ticks": 0.3, "suptitle": 0.6}


def _grid_rects(
    n_rows: int, n_cols: int, panel_inches: float
) -> tuple[tuple[float, float], list[list[tuple]]]:
    """Figure size and axes rectangles (figure fractions) of an n_rows × n_cols grid of square panels."""
    g, p = _GEOM, float(panel_inches)
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


def _panel_grid(n_rows: int, n_cols: int, panel_inches: float = 3.3) -> tuple:
    """A Figure with an n_rows × n_cols grid of square axes (2-D array), fixed layout."""
    (w, h), rects = _grid_rects(n_rows, n_cols, panel_inches)
    fig = Figure(figsize=(w, h))
    axes = np.array([[fig.add_axes(rect) for rect in row] for row in rects], dtype=object)
    fig.kfac_geometry = (n_rows, n_cols, float(panel_inches))
    return fig, axes


def _show_rows(fig: Figure, axes, n_visible: int) -> None:
    """Show only the first ``n_visible`` rows of a :func:`_panel_grid` figure, shrinking it to fit."""
    n_rows, n_cols, p = fig.kfac_geometry
    (w, h), rects = _grid_rects(n_visible, n_cols, p)
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
        """∇h = ∇θ (1/N) Σ_n L(y_n, f(x_n, θ)) of the selected layers, paper layout (MATH.md §1)."""
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
        """Factors with factored Tikhonov damping γ on the diagonal factors (MATH.md §4)."""
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
):
    """2×3 (or n×3) grid: reference | approximation | |difference| per row, one shared vmax."""
    diffs = [(ref - approx) for _, ref, _, approx, _ in rows]
    if vmax is None:
        vmax = shared_vmax(diffs)
        if not any(bool((d != 0).any()) for d in diffs):  # nothing to show in the differences
            vmax = shared_vmax([m for _, ref, _, approx, _ in rows for m in (ref, approx)])
    vmax = float(vmax)
    fig, axes = _panel_grid(len(rows), 3)
    panels = []
    for r, ((t_ref, ref, t_app, approx, t_diff), d) in enumerate(zip(rows, diffs)):
        for c, (title, M) in enumerate(((t_ref, ref), (t_app, approx), (t_diff, d))):
            p = MatrixPanel(axes[r, c], title)
            p.show(M, vmax, sizes, labels)
            panels.append(p)
    _suptitle(fig, f"{suptitle}\nabsolute values; white level {_fmt(vmax)} shared by all panels")
    fig.kfac_panels = panels
    return fig, vmax


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

    As in the paper the matrices are **undamped** (γ = 0). If the factors or the Schur complements
    Σ_{k|k+1} are singular at γ = 0, a tiny γ (:meth:`CurvatureStudy.default_small_gamma`) is used
    instead, the title says so and ``df.attrs["gamma_fallback"]`` is True. Pass ``gamma`` to choose.

    DataFrame: :func:`~kfac_lens.block_errors` of F̆ and F̂ against F̃ (per block and overall) with
    ``exact_by_construction`` (the blocks an approximation reproduces by definition: diagonal for F̆,
    tridiagonal for F̂), ``reproduced`` (``rel_error < 1e-6``; must be True where exact by
    construction), ``gamma`` and ``vmax``.
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
    fig, used_vmax = _comparison_figure(rows, study.sizes, study.labels, title, vmax)
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
    _attach(fig, df, figure="figure5", vmax=used_vmax, gamma=g, gamma_fallback=fallback, layers=study.layers)
    return fig, df


def figure6(study: CurvatureStudy, gamma: float, *, vmax: float | None = None):
    """Appendix C, Figure 6: F̃⁻¹ vs F̆⁻¹ (top row) and F̂⁻¹ (bottom row), with absolute differences.

    All three inverses use factored Tikhonov damping with strength ``gamma`` (Appendices E.3, E.6; the
    paper used the γ that K-FAC held at that iteration). **F̃⁻¹ here is the inverse of the damped F̃**
    (MATH.md §4: the diagonal factors Ā_kk + πγI, G_kk + (γ/π)I, cross factors undamped), the matrix
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
    fig, used_vmax = _comparison_figure(rows, study.sizes, study.labels, title, vmax)
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
                 variants=None) -> pd.DataFrame:
    """The improvement h(θ) − h(θ+δ) against γ for the update variants (KFAC.gamma_sweep)."""
    gammas = figure7_gammas(optimizer.gamma) if gammas is None else np.asarray(gammas, dtype=float)
    df = optimizer.gamma_sweep(X, y, gammas, lam=lam, progress=progress, cache=cache, variants=variants)
    return df.assign(figure="7", chosen_gamma=optimizer.gamma,
                     lam=optimizer.lam if lam is None else float(lam))


def draw_figure7(ax, df: pd.DataFrame, chosen_gamma: float | None, variants=None) -> dict:
    """Draw Figure 7's curves on ``ax``; improvements far below zero are clipped to the axis and marked ▼."""
    ax.clear()
    variants = list(FIGURE7_STYLES) if variants is None else list(variants)
    pos = df.loc[df["improvement"] > 0, "improvement"]
    top = float(pos.max()) if len(pos) else 1.0
    floor = -0.6 * top
    lines = {}
    clipped_label = "below the axis (h much worse)"
    for name in variants:
        d = df[df["variant"] == name].sort_values("gamma")
        if d.empty:
            continue
        st = FIGURE7_STYLES.get(name, {})
        yv = d["improvement"].to_numpy()
        (lines[name],) = ax.plot(d["gamma"], np.maximum(yv, floor), label=name, color=st.get("color"),
                                 marker=st.get("marker"), ms=4, lw=1.5)
        clipped = yv < floor
        if clipped.any():
            ax.plot(d["gamma"].to_numpy()[clipped], np.full(clipped.sum(), floor), linestyle="none",
                    marker="v", color=st.get("color"), ms=7, label=clipped_label)
            clipped_label = None
    ax.axhline(0.0, color="0.3", lw=0.8)
    if chosen_gamma is not None:
        ax.axvline(chosen_gamma, color="0.4", ls="--", lw=1)
        ax.plot([chosen_gamma], [0.0], marker="*", color="black", ms=12, linestyle="none",
                label=f"γ chosen by K-FAC ({chosen_gamma:.3g})")
    ax.set_xscale("log")
    ax.set_ylim(floor * 1.08, top * 1.12)
    ax.set_xlabel("γ (factored Tikhonov strength)")
    ax.set_ylabel("improvement h(θ) − h(θ+δ)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return lines


def figure7(optimizer, X, y, gammas=None, *, lam=None, title=None, progress=False):
    """Figure 7: the improvement h(θ) − h(θ+δ) against γ for the re-scaled update with and without K-FAC
    momentum and the raw Δ (Appendix E.4), on the network and data the optimizer is at (e.g. the zoo
    autoencoder at its captured iteration). A ▼ marks values below the axis (the raw Δ can make h far
    worse); the star marks the γ K-FAC chose. Returns (Figure, DataFrame)."""
    df = figure7_data(optimizer, X, y, gammas, lam=lam, progress=progress)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    draw_figure7(ax, df, optimizer.gamma)
    ax.set_title(title or f"Figure 7: update quality vs damping (iteration {optimizer.k - 1}, "
                          f"λ = {df['lam'].iloc[0]:.3g})", fontsize=10)
    return fig, df


# ============================================================================ companions (main text)
def figure_exact_vs_kfac(study: CurvatureStudy, *, vmax: float | None = None):
    """Exact F, F̃ and |F − F̃| side by side (the main text's Figure 2), one shared white level.

    DataFrame: :func:`~kfac_lens.block_errors` of F̃ against F (overall and per block), with ``vmax``.
    """
    F, Ft = study.F, study.F_tilde
    mats = [F, Ft, F - Ft]
    vmax = shared_vmax(mats) if vmax is None else float(vmax)
    fig, axes = _panel_grid(1, 3)
    panels = []
    for ax, title, M in zip(axes[0], (r"exact $F$", r"$\tilde F$ (K-FAC)", r"$|F - \tilde F|$"), mats):
        p = MatrixPanel(ax, title)
        p.show(M, vmax, study.sizes, study.labels)
        panels.append(p)
    _suptitle(
        fig,
        f"Exact Fisher vs its Kronecker-factored approximation, {study.name}, "
        f"layers {study.labels[0]}–{study.labels[-1]} (P = {study.n_params})",
    )
    fig.kfac_panels = panels
    df = block_errors(Ft, F, study.sizes, labels=study.labels, name="F̃ vs F")
    df["vmax"] = vmax
    _attach(fig, df, figure="exact_vs_kfac", vmax=vmax, layers=study.layers)
    return fig, df


def figure_inverse_structure(study: CurvatureStudy, gamma: float):
    """F̃ beside F̃⁻¹ (the main text's Figure 3): the inverse is close to block-tridiagonal.

    F̃⁻¹ is the inverse of the damped F̃ at ``gamma``. Exception to the shared white level, as in the
    paper's Figure 3: F̃ and its inverse differ in scale by orders of magnitude, so each panel has its
    own vmax (the ``vmax`` column): the 99.5th percentile of |F̃|, and for F̃⁻¹ that of its
    *off-diagonal blocks*, so that its strong diagonal blocks saturate and the contrast between the
    neighbouring blocks and those beyond them shows.

    DataFrame (one row per matrix: F̃, damped F̃, F̃⁻¹): fractions of the squared Frobenius mass on the
    diagonal blocks, the neighbouring blocks and beyond (:func:`block_mass`); for F̃⁻¹ the off-diagonal
    mass should sit mostly on the neighbouring blocks (``neighbour_share_of_off_diagonal`` near 1).
    """
    g = float(gamma)
    Ft, Fd, Finv = study.F_tilde, study.F_tilde_damped(g), study.F_tilde_inverse(g)
    fig, axes = _panel_grid(1, 2, panel_inches=4.0)
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
        panels.append(p)
        vmaxes.append(v)
    _suptitle(fig, f"$\\tilde F$ and its inverse, {study.name}: the inverse is nearly block-tridiagonal")
    fig.kfac_panels = panels
    rows = []
    for name, M, v in (
        ("F̃", Ft, vmaxes[0]),
        ("F̃ (damped)", Fd, float("nan")),
        ("F̃⁻¹ (damped F̃)", Finv, vmaxes[1]),
    ):
        rows.append(
            {"matrix": name, "gamma": g if name != "F̃" else 0.0, **block_mass(M, study.sizes), "vmax": v}
        )
    df = pd.DataFrame(rows)
    _attach(fig, df, figure="inverse_structure", vmax=tuple(vmaxes), gamma=g, layers=study.layers)
    return fig, df


# ============================================================================ Appendix B
CUMULANT_PANELS = (
    ("difference", r"$F - \tilde F$"),
    ("kappa4", r"$\kappa(\bar a^{(1)}, g^{(1)}, \bar a^{(2)}, g^{(2)})$"),
    ("mean_a1_kappa3", r"$\kappa(\bar a^{(1)})\,\kappa(\bar a^{(2)}, g^{(1)}, g^{(2)})$"),
    ("mean_a2_kappa3", r"$\kappa(\bar a^{(2)})\,\kappa(\bar a^{(1)}, g^{(1)}, g^{(2)})$"),
    ("residual", "residual"),
)


def cumulant_figure(panel_inches: float = 3.0) -> tuple[Figure, list[MatrixPanel]]:
    """An empty 1×5 figure for the Appendix B panels (fill it with :func:`draw_cumulants`)."""
    fig, axes = _panel_grid(1, len(CUMULANT_PANELS), panel_inches=panel_inches)
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
    for p, M in zip(panels, mats):
        p.show(M, vmax)
        p.ax.set_xlabel(f"{layer_label(l)}: (ā index, g index)", fontsize=8)
    panels[0].ax.set_ylabel(f"{layer_label(k)}: (ā index, g index)", fontsize=8)
    note = "exact over y" if terms.exact else f"estimator {terms.estimator!r}: the identity need not hold"
    _suptitle(
        fig,
        f"Appendix B: block ({layer_label(k)}, {layer_label(l)}) of $F - \\tilde F$ = sum of three "
        f"cumulant terms ({note}); white = {_fmt(vmax)}",
    )
    fig.kfac_panels = list(panels)
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
    """Block (k, l) of F − F̃ beside each Appendix B term and the residual (MATH.md §6).

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
    fig, panels = cumulant_figure()
    used = draw_cumulants(fig, panels, terms, vmax)
    df = terms.summary()
    df["vmax"] = used
    _attach(fig, df, figure="cumulants", vmax=used, block=(terms.k, terms.l))
    return fig, df


# ============================================================================ training curves
def figure_training_curves(histories: Mapping[str, pd.DataFrame], *, title: str = "Training curves"):
    """Loss (log scale) per iteration (left, log scale) and per second of wall-clock time (right).

    ``histories`` maps a run name to a DataFrame with columns ``iteration``, ``time`` (seconds),
    ``loss`` and optionally ``error``. When any run has ``error`` a second row plots it the same way
    (2×2 axes; otherwise 1×2). DataFrame: all histories stacked with a ``run`` column.
    """
    if not histories:
        raise ValueError("figure_training_curves needs at least one history DataFrame.")
    for name, h in histories.items():
        missing = {"iteration", "time", "loss"} - set(h.columns)
        if missing:
            raise ValueError(
                f"history {name!r} lacks column(s) {sorted(missing)}; "
                "need iteration, time (seconds), loss and optionally error."
            )
    has_error = any("error" in h.columns and h["error"].notna().any() for h in histories.values())
    n_rows = 2 if has_error else 1
    fig = Figure(figsize=(10, 3.8 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, 2, squeeze=False)
    for r, col in enumerate(["loss", "error"][:n_rows]):
        for c, (xcol, xlabel) in enumerate((("iteration", "iteration"), ("time", "time (s)"))):
            ax = axes[r, c]
            for name, h in histories.items():
                if col in h.columns:
                    vals = h[col].astype(float)
                    ok = vals > 0
                    ax.plot(h[xcol][ok], vals[ok], label=str(name), lw=1.3)
            ax.set_yscale("log")
            if xcol == "iteration":
                ax.set_xscale("log")  # first-order methods take many more (cheaper) iterations
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training " + ("loss" if col == "loss" else "error"))
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    df = pd.concat([h.assign(run=name) for name, h in histories.items()], ignore_index=True)
    _attach(fig, df, figure="training_curves")
    return fig, df


# ============================================================================ saving
def save_figure(fig: Figure, path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG (or the format the suffix names) at ``dpi``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
