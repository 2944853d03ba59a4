"""Matrix panels and panel grids: the display convention of docs/math.md §9, and the figure record.

A :class:`MatrixPanel` draws ``|M|`` in the paper layout (gray, 0 black, one white level ``vmax``,
block boundaries and layer ticks) and afterwards only updates its image in place; a
:class:`PanelGrid` is a Figure with a fixed grid of square axes (no layout engine, so a redraw costs
nothing but the drawing and an explorer can hide rows). :class:`DrawnFigure` is what every figure
function returns: the Figure, its metrics DataFrame and the panels drawn.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image

from ..curvature.blocks import block_offsets

__all__ = [
    "DEFAULT_DPI",
    "VMAX_QUANTILE",
    "DrawnFigure",
    "MatrixPanel",
    "PanelGrid",
    "fmt_level",
    "mean_pool",
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
QUANTILE_SAMPLE = 2_000_000  # at most this many pooled entries enter the quantile (a fixed stride)


def fmt_level(x: float) -> str:
    """A white level (or any number in a title) with three significant digits."""
    return f"{x:.3g}"


def numpy_abs(M) -> np.ndarray:
    """``|M|`` as a float64 NumPy array (from a tensor or an array)."""
    if isinstance(M, torch.Tensor):
        return M.detach().to("cpu", torch.float64).abs().numpy()
    return np.abs(np.asarray(M, dtype=np.float64))


def numpy_abs_diff(A, B) -> np.ndarray:
    """``|A − B|`` as a float64 NumPy array, the difference's own buffer taking the absolute value in place."""
    if isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor):
        return torch.sub(A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)).abs_().numpy()
    return np.abs(np.asarray(A, dtype=np.float64) - np.asarray(B, dtype=np.float64))


def percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation, the same value to the bit) from one
    ``np.partition`` at the two order statistics it needs: half the time on the explorers' 2 million
    pooled entries."""
    n = values.size
    pos = (n - 1) * (q / 100.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    part = np.partition(values, [lo, hi] if hi != lo else lo)
    a, b, t = part[lo], part[hi], pos - lo
    d = b - a
    return float(b - d * (1 - t)) if t >= 0.5 else float(a + d * t)  # (numpy's own lerp, both branches)


def shared_vmax(matrices: Sequence, quantile: float = VMAX_QUANTILE, *, absolute: bool = False) -> float:
    """The white level shared by a figure's panels: the ``quantile``-th percentile of |entries|.

    Entries of all ``matrices`` are pooled (a fixed stride keeps at most about 2 million of them, so
    the value is deterministic and cheap for P = 1680). Falls back to the largest |entry| when the
    quantile is 0 (mostly-zero panels) and to 1 for all-zero input, so vmax is always > 0.
    ``absolute=True``: the matrices are float64 arrays of |entries| already (:func:`numpy_abs`).
    """
    flats = [
        (m if absolute else np.abs(np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m,
                                              dtype=np.float64))).ravel()
        for m in matrices
    ]
    total = sum(f.size for f in flats)
    if total == 0:
        return 1.0
    stride = max(1, math.ceil(total / QUANTILE_SAMPLE))
    pooled = np.concatenate([f[::stride] for f in flats])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return 1.0
    v = percentile(pooled, quantile)
    if not v > 0:
        v = float(
            max(float(np.max(np.abs(f[np.isfinite(f)]))) if np.isfinite(f).any() else 0.0 for f in flats)
        )
    return v if v > 0 else 1.0


def mean_pool(data: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor × factor`` tiles of ``data`` (edge tiles average only the entries they hold)."""
    f = int(factor)
    if f <= 1:
        return data
    n, m = data.shape
    pn, pm = -(-n // f) * f, -(-m // f) * f
    if (pn, pm) == (n, m):  # whole tiles: no padded copy; rows of tiles first (contiguous sums, twice as fast)
        return data.reshape(n, m // f, f).sum(axis=2).reshape(n // f, f, m // f).sum(axis=1) / float(f * f)
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
    so figures kept alive by the explorers are never rebuilt. ``data`` holds the |M| last shown.
    :meth:`add_colorbar` attaches a slim colourbar (0 to the white level, ticks at 0, vmax/2 and vmax)
    just right of the panel; ``colorbar`` is None until then.

    ``max_pixels`` (used by the explorers, where every redraw counts): when the matrix has at least
    twice as many rows as the panel has pixels, the image holds ``|M|`` mean-pooled over ``f × f``
    tiles, ``f = n // max_pixels`` (what an antialiasing filter would show anyway, at a fraction of the
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

    @property
    def layout(self) -> tuple:
        """What fixes the panel's frame (title, layer blocks, matrix size, visibility): the parts of a
        redraw that :meth:`PanelGrid.png` keeps while they stay the same."""
        return (self.ax.get_visible(), self.ax.get_title(), self._blocks, self._extent, self.colorbar is None)

    def moving_artists(self) -> list:
        """The artists an update changes, in drawing order: the image, the block lines, the frame over them."""
        if self.image is None or not self.ax.get_visible():
            return []
        return [self.image, *self.lines, *self.ax.spines.values()]

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
        data = numpy_abs(M)
        self.show_abs(data, vmax, sizes, labels, col_sizes, col_labels)
        return data

    def show_abs(self, data: np.ndarray, vmax: float, sizes=None, labels=None, col_sizes=None,
                 col_labels=None) -> None:
        """:meth:`show` for ``|M|`` already at hand (a float64 array of absolute values, :func:`numpy_abs`)."""
        n_rows, n_cols = data.shape
        f = 1
        if self.max_pixels and max(n_rows, n_cols) >= 2 * self.max_pixels:
            f = max(n_rows, n_cols) // int(self.max_pixels)
        shown = mean_pool(data, f) if f > 1 else data
        if not np.isfinite(shown).all():  # a tile's mean is finite only when all its entries are
            raise ValueError("a matrix panel contains NaN or Inf; refusing to draw a NaN figure.")
        self.data = data
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

    def outline(self, rows: slice, cols: slice, color: str = "tab:cyan") -> Rectangle:
        """Outline the entries ``[rows, cols]`` (e.g. one layer block) with a rectangle; returns it."""
        box = Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start, rows.stop - rows.start,
                        fill=False, ec=color, lw=1.5)
        self.ax.add_patch(box)
        return box

    def _colorbar_ticks(self) -> None:
        v = float(self.vmax)
        self.colorbar.set_ticks([0.0, v / 2, v], labels=["0", fmt_level(v / 2), fmt_level(v)])

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
            offs = block_offsets(sz)
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
# per draw (explorers redraw on every control move) and lets an explorer hide a row by shrinking the
# figure. With colourbars (the figure functions; the explorers go without) each panel's slim bar sits
# in the gap to its right, which widens to hold the bar and its tick labels.
GEOMETRY = {"left": 0.5, "right": 0.15, "wgap": 0.55, "title": 0.32, "ticks": 0.3, "suptitle": 0.6}
GEOMETRY_COLORBARS = {"wgap": 1.05, "right": 0.75}


@dataclass(eq=False)
class PanelGrid:
    """A Figure with an ``n_rows × n_cols`` grid of square axes at a fixed layout (:meth:`create`).

    ``panels`` holds one :class:`MatrixPanel` per axes (created with ``max_pixels``);
    ``colorbars=True`` leaves room right of every panel for :meth:`MatrixPanel.add_colorbar`;
    ``extra_top`` (inches) makes room for a title of more than two lines.
    """

    figure: Figure
    axes: np.ndarray
    panels: list[list[MatrixPanel]]
    panel_inches: float
    colorbars: bool = False
    extra_top: float = 0.0
    title: Text | None = None
    _canvas: FigureCanvasAgg | None = field(default=None, repr=False)
    _background: tuple | None = field(default=None, repr=False)

    @classmethod
    def create(cls, n_rows: int, n_cols: int, panel_inches: float = 3.3, *, colorbars: bool = False,
               extra_top: float = 0.0, max_pixels: int | None = None) -> PanelGrid:
        (w, h), rects = _grid_rects(n_rows, n_cols, panel_inches, colorbars, extra_top)
        fig = Figure(figsize=(w, h))
        axes = np.array([[fig.add_axes(rect) for rect in row] for row in rects], dtype=object)
        panels = [[MatrixPanel(ax, max_pixels=max_pixels) for ax in row] for row in axes]
        return cls(fig, axes, panels, float(panel_inches), bool(colorbars), float(extra_top))

    @property
    def shape(self) -> tuple[int, int]:
        return self.axes.shape

    def show_rows(self, n_visible: int) -> None:
        """Show only the first ``n_visible`` rows, shrinking the figure to fit."""
        n_rows, n_cols = self.shape
        (w, h), rects = _grid_rects(n_visible, n_cols, self.panel_inches, self.colorbars, self.extra_top)
        self.figure.set_size_inches(w, h)
        for r in range(n_rows):
            for c in range(n_cols):
                ax = self.axes[r][c]
                ax.set_visible(r < n_visible)
                if r < n_visible:
                    ax.set_position(rects[r][c])

    def suptitle(self, text: str) -> None:
        """The figure's title, at the top of the band reserved for it."""
        h = self.figure.get_size_inches()[1]
        self.title = self.figure.suptitle(text, fontsize=10, y=1 - 0.12 / h, va="top")

    def png(self, dpi: int, compress_level: int = 1) -> bytes:
        """PNG bytes of the figure at ``dpi``, drawing only what changed since the last call.

        An explorer's update changes the images (in place, ``set_data``), the block lines and the title;
        while the rest of the frame (figure size, visible rows, panel titles, layer blocks) stays as it
        was, that rest is restored from the background saved by the last full draw and only the moving
        artists are drawn over it. Anything else draws the whole figure again (as ``savefig`` would).
        """
        if self._canvas is None or self.figure.canvas is not self._canvas:
            self._canvas = FigureCanvasAgg(self.figure)
        if self.figure.dpi != dpi:
            self.figure.set_dpi(dpi)
        panels = [p for row in self.panels for p in row]
        moving = [a for p in panels for a in p.moving_artists()] + ([self.title] if self.title else [])
        key = (dpi, tuple(self.figure.get_size_inches()), tuple(p.layout for p in panels))
        if self._background is None or self._background[0] != key or self.colorbars:
            for a in moving:
                a.set_visible(False)
            self._canvas.draw()
            self._background = (key, self._canvas.copy_from_bbox(self.figure.bbox))
            for a in moving:
                a.set_visible(True)
        self._canvas.restore_region(self._background[1])
        renderer = self._canvas.get_renderer()
        for p in panels:  # set_position (show_rows) undoes the equal-aspect shrink that a full draw applies
            if p.ax.get_visible():
                p.ax.apply_aspect()
        for a in moving:
            a.draw(renderer)
        w, h = self._canvas.get_width_height()
        buf = io.BytesIO()
        Image.frombuffer("RGBA", (w, h), self._canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
            buf, format="png", compress_level=compress_level)
        return buf.getvalue()


def _grid_rects(
    n_rows: int, n_cols: int, panel_inches: float, colorbars: bool = False, extra_top: float = 0.0
) -> tuple[tuple[float, float], list[list[tuple]]]:
    """Figure size and axes rectangles (figure fractions) of an n_rows × n_cols grid of square panels."""
    g, p = {**GEOMETRY, **(GEOMETRY_COLORBARS if colorbars else {})}, float(panel_inches)
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


@dataclass(eq=False)
class DrawnFigure:
    """A drawn figure: ``figure``, its ``metrics`` DataFrame and what was drawn.

    ``panels``: the main matrix panels (row by row); ``matrix_panels``: every matrix panel (with
    extras such as Figure 5's zoom, ``zoom_panel``); ``meta``: the figure's numbers (white levels,
    γ, layers, …; also in ``metrics.attrs``). Unpacks (and indexes) as the pair ``figure, metrics``.
    """

    figure: Figure
    metrics: pd.DataFrame
    panels: list[MatrixPanel] = field(default_factory=list)
    matrix_panels: list[MatrixPanel] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    zoom_panel: MatrixPanel | None = None

    def __post_init__(self) -> None:
        self.metrics.attrs.update(self.meta)

    def __iter__(self) -> Iterator:
        return iter((self.figure, self.metrics))

    def __getitem__(self, i: int):
        return (self.figure, self.metrics)[i]

    def __len__(self) -> int:
        return 2


def save_figure(fig: Figure, path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG (or the format the suffix names) at ``dpi``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
