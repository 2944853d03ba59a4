"""``ApproximationExplorer``: approximations of the exact Fisher side by side under γ, layer and
approximation controls (the interactive face of :func:`kfac_lens.compare_approximations`)."""

from __future__ import annotations

import math
import time

import ipywidgets as W
import pandas as pd
import torch
from matplotlib.figure import Figure

from .errors import SingularFactorError
from .explorer_base import (WIDGET_DPI, Explorer, GammaLayerControls, error_html, figure_png, image_widget,
                            table_html)
from .study import layer_label


class ApproximationExplorer(GammaLayerControls, Explorer):
    """Approximations of the exact Fisher side by side (docs/math.md §5; K-FAC Sections 3.2–3.3, EK-FAC):
    the error table, the preconditioned spectrum and the matrix view, under controls.

    Controls: ``approx_select`` (the approximations whose spectrum and matrix are shown; the first one's
    matrix), ``gamma_slider`` (log scale, "γ") and ``layer_select`` (a subset of ``layers``). ``metrics``
    (also in ``table``) has one row per approximation with ``rel_frobenius`` = ‖F − F_a‖_F/‖F‖_F,
    ``ng_cosine`` (with ``y``), and for the selected ones ``theta_max`` and ``precond_cond`` of
    ``(F_a,γ)⁻¹(F + γ²I)`` (the values of ``compare_approximations(..., method="dense")``; the spectrum by
    Lanczos). The figure: the top eigenvalues of each selected preconditioned operator, then |F|, |F_a|
    and |F − F_a| on one shared white level. Everything is cached per layer subset and per γ
    (:class:`~kfac_lens.curvature.quality_cache.ApproximationQuality`), so a move back costs only the draw;
    the matrix images are redrawn only when the layers or the first approximation change. ``timings``
    holds the last update's compute, draw and render seconds. Dense only: P ≤ ``max_params``.
    """

    def __init__(self, model, X, likelihood, y=None, *, layers=None, gamma: float = 1e-2,
                 approximations=None, shown=("kfac-blockdiag", "kfac-tridiag"),
                 gamma_range: tuple[float, float] = (1e-4, 1e1), top_k: int = 10, dpi: int = WIDGET_DPI,
                 panel_inches: float = 2.6, max_params: int | None = None):
        from .curvature.approximations import APPROXIMATIONS
        from .curvature.quality_cache import MAX_PARAMS, ApproximationQuality

        self.quality = ApproximationQuality(model, X, likelihood, y, layers,
                                            APPROXIMATIONS if approximations is None else approximations,
                                            top_k=top_k, max_params=MAX_PARAMS if max_params is None else max_params)
        self.quality.check_layers(self.quality.layers)  # refuse a P too large for dense matrices here, not later
        names = [str(a) for a in self.quality.names]
        bad = [s for s in shown if s not in names]
        if bad:
            raise ValueError(f"shown: {bad} are not among approximations={names}; pick from those.")
        self.dpi, self.panel_inches = dpi, panel_inches
        lo, hi = min(gamma_range[0], float(gamma)), max(gamma_range[1], float(gamma))
        self.gamma_slider = W.FloatLogSlider(value=float(gamma), base=10, min=math.log10(lo), max=math.log10(hi),
                                             step=0.05, description="γ", continuous_update=False,
                                             readout_format=".3g")
        self.approx_select = W.SelectMultiple(options=names, value=tuple(shown) or (names[0],),
                                              description="approx.", rows=min(len(names), 7))
        self.layer_select = W.SelectMultiple(options=[(f"{layer_label(k)} (layer {k})", k)
                                                      for k in self.quality.layers],
                                             value=tuple(self.quality.layers), description="layers",
                                             rows=min(len(self.quality.layers), 6))
        # two figures: a γ move redraws only the spectrum; the matrices follow the layers and the approximation
        self.fig = Figure(figsize=(panel_inches + 1.4, panel_inches + 0.6))
        self.fig.subplots_adjust(left=0.2, right=0.97, bottom=0.15, top=0.88)
        self.ax = self.fig.add_subplot(1, 1, 1)
        self.matrix_fig = Figure(figsize=(3 * panel_inches, panel_inches + 0.4))
        self.matrix_fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.06)
        self.matrix_axes = self.matrix_fig.subplots(1, 3)
        self.image, self.matrix_image = image_widget(), image_widget()
        self.table, self.status = W.HTML(), W.HTML()
        self.metrics: pd.DataFrame | None = None
        self.timings: dict[str, float] = {}
        self._matrix_key = None
        self.widget = W.VBox([W.HBox([self.gamma_slider, self.approx_select, self.layer_select]),
                              W.HBox([self.image, self.matrix_image]), self.table, self.status])
        for w in (self.gamma_slider, self.approx_select, self.layer_select):
            w.observe(lambda change: self.update(), names="value")
        self.update()


    @property
    def shown(self) -> list[str]:
        return [n for n in self.approx_select.options if n in self.approx_select.value]

    def _draw_matrices(self, base: dict, name: str) -> None:
        from .curvature.approximations import Approximation

        F, Fa = base["F"], base["dense"][Approximation(name)]
        mats = [("F (exact)", F), (f"{name}", Fa), (f"|F − {name}|", F - Fa)]
        vmax = float(torch.quantile(F.abs().flatten()[::max(1, F.numel() // 200_000)], 0.995)) or 1.0
        pixels = max(int(self.panel_inches * self.dpi), 1)
        kernel = max(1, math.ceil(F.shape[0] / pixels))  # max-pool |M| to the panel's pixels: nothing vanishes
        for ax, (title, M) in zip(self.matrix_axes, mats):
            ax.clear()
            A = torch.nn.functional.max_pool2d(M.abs()[None, None], kernel, ceil_mode=True)[0, 0]
            ax.imshow(A.cpu().numpy(), cmap="gray_r", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        self.matrix_image.value = figure_png(self.matrix_fig, self.dpi)

    def update(self) -> None:
        t0 = time.perf_counter()
        layers, shown, g = self.layers, self.shown, self.gamma
        if not layers or not shown:
            self.status.value = error_html("Select at least one layer and one approximation.")
            return
        try:
            base = self.quality.base(layers)
            metrics = self.quality.table(layers, g, shown)
            spectra = {name: self.quality.spectrum(layers, g, name) for name in shown}
        except (SingularFactorError, ValueError, RuntimeError) as e:
            self.status.value = error_html(f"γ = {g:.3g}, layers {layers}: {e}")
            return
        t1 = time.perf_counter()
        ax = self.ax
        ax.clear()
        for name, eigs in spectra.items():
            ax.semilogy(range(1, len(eigs) + 1), eigs, marker=".", label=name)
        ax.set_title(f"top eigenvalues of (F_a,γ)⁻¹(F+γ²I), γ = {g:.3g}", fontsize=8)
        ax.set_xlabel("index", fontsize=8)
        ax.legend(fontsize=7)
        self.metrics = metrics
        self.table.value = (f"<small>Against the exact F on layers {layers} (P = {base['P']}), γ = {g:.3g}: "
                            "relative Frobenius error (undamped), natural-gradient cosine with (F + γ²I)⁻¹∇h, "
                            "and for the selected approximations the top eigenvalue and the (Ritz) condition "
                            "number of the preconditioned operator</small>" + table_html(metrics))
        t2 = time.perf_counter()
        self.image.value = figure_png(self.fig, self.dpi)
        key = (tuple(layers), shown[0])
        if key != self._matrix_key:  # drawn and rendered only when they change
            self._draw_matrices(base, shown[0])
            self._matrix_key = key
        t3 = time.perf_counter()
        self.timings = {"compute_s": t1 - t0, "draw_s": t2 - t1, "render_s": t3 - t2, "total_s": t3 - t0}
        self.status.value = (f"<small>P = {base['P']}; update {self.timings['total_s']:.2f} s "
                             f"(compute {t1 - t0:.2f}, render {t3 - t2:.2f})</small>")
