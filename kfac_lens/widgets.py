"""Interactive explorers (ipywidgets): control wiring around the ``draw_*`` functions of :mod:`kfac_lens.figures`.

Each explorer keeps one persistent matplotlib ``Figure`` and its image artists, updates the artists in
place when a control changes (``observe`` callbacks) and shows the figure as PNG bytes in an
``ipywidgets.Image``. That needs no ipympl and no pyplot, works in JupyterLab (standard widget
manager), in Voila and in plain pytest (the callbacks run synchronously when a test sets a control's
``value``), and a browser sees each redraw as a new ``<img>`` ``src``. Metrics are pandas DataFrames
(``.metrics``) shown as HTML tables.

- :class:`DampingExplorer` — Figure 6 live under a γ slider, with the inverse and the layers to show.
- :class:`FisherExplorer` — F, F̃ and |F − F̃| for one or several networks, and the Appendix B
  cumulant terms of a chosen block.
- :class:`ApproximationExplorer` — every approximation of F against the exact one: error table,
  preconditioned spectrum and matrix view, under γ, layer and approximation controls.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Mapping

import ipywidgets as W
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from .approximation_explorer import ApproximationExplorer
from .curvature.blocks import block_slices
from .explorer_base import (
    WIDGET_DPI,
    Explorer,
    GammaLayerControls,
    error_html,
    figure_png,
    image_widget,
    table_html,
)
from .errors import SingularFactorError
from .figures import PanelGrid, cumulant_grid, draw_cumulants, draw_exact_vs_kfac, draw_figure6, draw_figure7
from .study import CurvatureStudy, Inverse, layer_label
from .sweep import SweepCache, figure7_data, variants_shown

__all__ = ["ApproximationExplorer", "DampingExplorer", "FisherExplorer", "RescalingExplorer", "figure_png"]

# ============================================================================ DampingExplorer
class DampingExplorer(GammaLayerControls, Explorer):
    """Figure 6 under a γ slider: F̃⁻¹ vs F̆⁻¹ and F̂⁻¹ (damped, factored Tikhonov), with a metrics table.

    Controls: ``gamma_slider`` (log scale, "γ"), ``inverse_choice`` ("both", "block-diagonal",
    "block-tridiagonal": which rows of the figure to show) and ``layer_select`` (the subset of the
    study's layers; a sub-study shares F, the factors and ∇h, so only the γ-dependent pieces are
    recomputed). The figure (``grid``/``fig``, panels in ``panels[row][col]``) is drawn by
    :func:`~kfac_lens.figures.comparisons.draw_figure6`, Figure 6's own code, in place (``set_data``)
    with one shared white level (the 99.5th percentile of both difference panels, so it does not change
    with ``inverse_choice``). A γ move changes only the images and the title, so only those are drawn
    again over the saved rest of the figure (:meth:`~kfac_lens.figures.panels.PanelGrid.png`) before
    the PNG goes to ``image``.

    ``metrics`` (also shown in ``table``): for F̆⁻¹, F̂⁻¹ and F̃⁻¹, the relative Frobenius error against
    F̃⁻¹ (overall and on the diagonal blocks) and the cosine of the direction F⁻¹∇h each gives with
    the exact ``(F + γ² I)⁻¹∇h``. γ² because factored Tikhonov with strength γ stands in for adding
    ``(λ+η) I`` to the curvature (γ is kept near √(λ+η), Appendix E.3/E.6; the isotropic part of
    ``(Ā+πγI)⊗(G+γ/π I)`` is γ² I). The cosines need the study to have been built with ``y``.
    ``timings`` holds the last update's compute and render times in seconds.
    """

    INVERSE_CHOICES = ("both", "block-diagonal", "block-tridiagonal")

    def __init__(
        self,
        study: CurvatureStudy,
        gamma: float = 1e-2,
        layers=None,
        *,
        gamma_range: tuple[float, float] = (1e-4, 1e1),
        dpi: int = WIDGET_DPI,
        panel_inches: float = 3.0,
    ):
        if not isinstance(study, CurvatureStudy):
            raise TypeError(
                "DampingExplorer needs a kfac_lens.study.CurvatureStudy (build one with "
                "CurvatureStudy(model, X, y, likelihood, layers))."
            )
        self.study = study
        self.dpi = dpi
        lo, hi = (float(v) for v in gamma_range)
        lo, hi = min(lo, float(gamma)), max(hi, float(gamma))
        self.grid = PanelGrid.create(2, 3, panel_inches=panel_inches, max_pixels=int(panel_inches * dpi))
        self.fig, self.panels = self.grid.figure, self.grid.panels
        self.gamma_slider = W.FloatLogSlider(
            value=float(gamma),
            base=10,
            min=math.log10(lo),
            max=math.log10(hi),
            step=0.05,
            description="γ",
            continuous_update=False,
            readout_format=".3g",
        )
        self.inverse_choice = W.Dropdown(options=self.INVERSE_CHOICES, value="both", description="inverse")
        options = [(f"{layer_label(k)} (layer {k})", k) for k in study.layers]
        sel = study.layers if layers is None else study.factors.select(layers)
        self.layer_select = W.SelectMultiple(
            options=options, value=tuple(sel), description="layers", rows=min(len(options), 6)
        )
        self.image = image_widget()
        self.table = W.HTML()
        self.status = W.HTML()
        self.metrics: pd.DataFrame | None = None
        self.timings: dict[str, float] = {}
        self.widget = W.VBox(
            [
                W.HBox([self.gamma_slider, self.inverse_choice, self.layer_select]),
                self.image,
                self.table,
                self.status,
            ]
        )
        for w in (self.gamma_slider, self.inverse_choice, self.layer_select):
            w.observe(self._on_change, names="value")
        self.update()

    # ------------------------------------------------------------------ public

    @property
    def current_study(self) -> CurvatureStudy:
        return self.study.subset(self.layers)

    def set_gamma(self, gamma: float) -> DampingExplorer:
        """Move the slider to ``gamma`` (widening its range if needed); the figure and table follow."""
        g = float(gamma)
        if not g > 0:
            raise ValueError(f"gamma must be > 0 on a log slider, got {gamma!r}.")
        e = math.log10(g)
        if e < self.gamma_slider.min:
            self.gamma_slider.min = math.floor(e)
        if e > self.gamma_slider.max:
            self.gamma_slider.max = math.ceil(e)
        self.gamma_slider.value = g
        return self

    # ------------------------------------------------------------------ callbacks
    def _on_change(self, change=None) -> None:
        self.update()

    def update(self) -> None:
        t0 = time.perf_counter()
        layers = self.layers
        if not layers:
            self.status.value = error_html("Select at least one layer.")
            return
        g = self.gamma
        st = self.study.subset(layers)
        choice = self.inverse_choice.value
        shown = [Inverse(c) for c in self.INVERSE_CHOICES[1:]] if choice == "both" else [Inverse(choice)]
        try:
            metrics = st.damping_metrics(g)
            t1 = time.perf_counter()
            vmax = draw_figure6(self.grid, st, g, shown, title=lambda v: (  # no mathtext: parsed on every move
                f"Figure 6 live: {st.name}, factored Tikhonov γ = {g:.3g}, white = {v:.3g}"))
        except (SingularFactorError, ValueError, RuntimeError) as e:  # torch.linalg errors are RuntimeErrors
            self.status.value = error_html(f"γ = {g:.3g}: {e}")
            return
        self.vmax = vmax
        self.metrics = metrics
        self.table.value = (
            f"<small>Relative Frobenius error against F̃⁻¹ (the inverse of the damped F̃), "
            f"overall and on the diagonal blocks, and the cosine of each F⁻¹∇h with the exact "
            f"(F + γ²I)⁻¹∇h; γ = {g:.3g}</small>" + table_html(metrics)
        )
        t2 = time.perf_counter()
        self.image.value = self.grid.png(self.dpi)  # redraws only the images and the title on a γ move
        t3 = time.perf_counter()
        self.timings = {"compute_s": t1 - t0, "draw_s": t2 - t1, "render_s": t3 - t2, "total_s": t3 - t0}
        self.status.value = (
            f"<small>P = {st.n_params}; update {self.timings['total_s']:.2f} s "
            f"(compute {t1 - t0:.2f}, render {t3 - t2:.2f})</small>"
        )


# ============================================================================ FisherExplorer
def _as_study(entry, name: str) -> CurvatureStudy:
    if isinstance(entry, CurvatureStudy):
        return entry
    if isinstance(entry, Mapping):
        return CurvatureStudy(
            entry["model"],
            entry["X"],
            entry.get("y"),
            entry.get("likelihood", "categorical"),
            entry.get("layers"),
            name=entry.get("name", name),
        )
    if isinstance(entry, (tuple, list)) and 2 <= len(entry) <= 5:
        model, X, *rest = entry
        y = rest[0] if len(rest) > 0 else None
        lik = rest[1] if len(rest) > 1 else "categorical"
        layers = rest[2] if len(rest) > 2 else None
        return CurvatureStudy(model, X, y, lik, layers, name=name)
    raise TypeError(
        f"network {name!r}: expected a CurvatureStudy, a (model, X, y, likelihood, layers) tuple "
        f"or a dict with those keys; got {type(entry).__name__}."
    )


class FisherExplorer(Explorer):
    """F, F̃ and |F − F̃| of one or several networks, and the Appendix B terms of a chosen block.

    ``source`` is a :class:`CurvatureStudy`; or a model (then pass ``X``, ``y``, ``likelihood``,
    ``layers``); or several networks to pick from in ``network_dropdown`` — a dict ``name → entry``
    (e.g. zoo entries at different iterations) or a list of entries, an entry being a
    CurvatureStudy, a tuple ``(model, X, y, likelihood, layers)`` (trailing items optional) or a dict
    with those keys. Studies are built lazily, on first selection, and kept.

    ``row_dropdown`` / ``col_dropdown`` pick block (k, l) (0-based layers); the block is outlined on the
    top figure (``fig``, ``panels``) and its Appendix B decomposition is drawn in ``cumulant_fig``
    (F − F̃ | κ₄ | κ(ā₁)κ₃ | κ(ā₂)κ₃ | residual, see :func:`~kfac_lens.figures.figure_cumulants`).
    ``metrics`` combines that block's relative error of F̃ against F with the terms' norms.
    """

    def __init__(
        self,
        source,
        X=None,
        y=None,
        likelihood="categorical",
        layers=None,
        *,
        block=None,
        name: str | None = None,
        dpi: int = WIDGET_DPI,
        panel_inches: float = 3.0,
    ):
        self.dpi = dpi
        self._entries: OrderedDict[str, object] = OrderedDict()
        if isinstance(source, CurvatureStudy):
            self._entries[name or source.name] = source
        elif isinstance(source, Mapping):
            for key, entry in source.items():
                self._entries[str(key)] = entry
        elif isinstance(source, (list, tuple)) and source and isinstance(source[0], nn.Module):
            self._entries[name or "network"] = tuple(source)  # one (model, X, y, likelihood, layers) entry
        elif isinstance(source, (list, tuple)):
            for i, entry in enumerate(source):
                key = entry.name if isinstance(entry, CurvatureStudy) else f"network {i}"
                self._entries[key] = entry
        else:
            if X is None:
                raise ValueError("FisherExplorer(model, ...) needs the inputs X (and y for gradients).")
            self._entries[name or "network"] = (source, X, y, likelihood, layers)
        if not self._entries:
            raise ValueError("FisherExplorer needs at least one network.")
        self._studies: dict[str, CurvatureStudy] = {}
        self._updating = False
        px = int(panel_inches * dpi)
        self.grid = PanelGrid.create(1, 3, panel_inches=panel_inches, max_pixels=px)
        self.fig, self.panels = self.grid.figure, self.grid.panels[0]
        self._boxes: list = []
        self.cumulant_grid = cumulant_grid(panel_inches, max_pixels=px)
        self.cumulant_fig, self.cumulant_panels = self.cumulant_grid.figure, self.cumulant_grid.panels[0]
        self.network_dropdown = W.Dropdown(options=list(self._entries), description="network")
        self.row_dropdown = W.Dropdown(description="block row")
        self.col_dropdown = W.Dropdown(description="block col")
        self.image = image_widget()
        self.cumulant_image = image_widget()
        self.table = W.HTML()
        self.status = W.HTML()
        self.metrics: pd.DataFrame | None = None
        self.timings: dict[str, float] = {}
        controls = [self.row_dropdown, self.col_dropdown]
        if len(self._entries) > 1:
            controls.insert(0, self.network_dropdown)
        self.widget = W.VBox([W.HBox(controls), self.image, self.cumulant_image, self.table, self.status])
        self.network_dropdown.observe(self._on_network, names="value")
        self.row_dropdown.observe(self._on_block, names="value")
        self.col_dropdown.observe(self._on_block, names="value")
        self._show_network(block)

    # ------------------------------------------------------------------ public
    @property
    def study(self) -> CurvatureStudy:
        key = self.network_dropdown.value
        if key not in self._studies:
            self._studies[key] = _as_study(self._entries[key], key)
        return self._studies[key]

    @property
    def block(self) -> tuple[int, int]:
        return int(self.row_dropdown.value), int(self.col_dropdown.value)

    def set_block(self, k: int, l: int) -> FisherExplorer:
        """Pick block (k, l) (0-based layers of the current network) and redraw its Appendix B terms."""
        layers = self.study.layers
        if k not in layers or l not in layers:
            raise ValueError(f"block ({k}, {l}) is not among this network's layers {layers}.")
        self._updating = True
        try:
            self.row_dropdown.value = int(k)
            self.col_dropdown.value = int(l)
        finally:
            self._updating = False
        self._show_block()
        return self

    def set_network(self, name: str) -> FisherExplorer:
        self.network_dropdown.value = name
        return self

    # ------------------------------------------------------------------ callbacks
    def _on_network(self, change=None) -> None:
        self._show_network(None)

    def _on_block(self, change=None) -> None:
        if not self._updating:
            self._show_block()

    def _show_network(self, block) -> None:
        t0 = time.perf_counter()
        st = self.study
        options = [(f"{layer_label(k)} (layer {k})", k) for k in st.layers]
        if block is None:
            k = st.layers[0]
            l = st.layers[1] if len(st.layers) > 1 else k
        else:
            k, l = (int(v) for v in block)
        self._updating = True
        try:
            self.row_dropdown.options = options
            self.col_dropdown.options = options
            self.row_dropdown.value = k
            self.col_dropdown.value = l
        finally:
            self._updating = False
        self.vmax = draw_exact_vs_kfac(self.grid, st)
        self.timings["network_s"] = time.perf_counter() - t0
        self._show_block()

    def _show_block(self) -> None:
        t0 = time.perf_counter()
        st = self.study
        k, l = self.block
        where = dict(zip(st.layers, block_slices(st.sizes)))
        for box in self._boxes:
            box.remove()
        self._boxes = [p.outline(where[k], where[l]) for p in self.panels]
        try:
            terms = st.cumulants(k, l)
        except ValueError as e:
            self.status.value = error_html(str(e))
            return
        self.cumulant_vmax = draw_cumulants(self.cumulant_grid, terms)
        err = st.block_errors_of_F_tilde(k, l)
        summary = terms.summary().set_index("term")[["frobenius", "relative_to_difference"]]
        head = pd.DataFrame(
            {"frobenius": [err["F"], err["difference"]], "relative_to_difference": [float("nan"), 1.0]},
            index=["F block", "F − F̃ block"],
        )
        metrics = pd.concat([head, summary.drop(index="difference")])
        metrics.attrs.update(block=(k, l), rel_error_F_tilde=err["rel_error"])
        self.metrics = metrics
        rel = metrics.attrs["rel_error_F_tilde"]
        self.table.value = (
            f"<b>block ({layer_label(k)}, {layer_label(l)})</b>: ‖F − F̃‖/‖F‖ = {rel:.3g}"
            + table_html(metrics)
        )
        t1 = time.perf_counter()
        self.image.value = figure_png(self.fig, self.dpi)
        self.cumulant_image.value = figure_png(self.cumulant_fig, self.dpi)
        t2 = time.perf_counter()
        self.timings.update(block_compute_s=t1 - t0, render_s=t2 - t1)
        self.status.value = f"<small>block update {t2 - t0:.2f} s</small>"


# ============================================================================ RescalingExplorer
class RescalingExplorer(Explorer):
    """Figure 7 live: the improvement h(θ) − h(θ+δ) against γ (Appendix E.4), with the γ range, λ and
    K-FAC momentum as controls, and a star at the γ K-FAC actually chose.

    ``optimizer`` is a :class:`kfac_lens.KFAC` at the iteration to examine (e.g. ``zoo.autoencoder().optimizer``)
    and (X, y) the data h is measured on. γ values lie on a fixed lattice of ``per_decade`` points per
    decade, and each γ's proposal Δ is cached, so moving λ or the range only recomputes new γ values
    and the cheap re-scaling. ``data`` holds the plotted numbers (:func:`figure7_data`'s columns).
    """

    def __init__(self, optimizer, X, y, *, decades: tuple[float, float] = (-3.0, 2.0), per_decade: int = 2,
                 dpi: int = 90):
        if optimizer.factors is None:
            raise ValueError("RescalingExplorer needs a K-FAC optimizer that has taken at least one step.")
        self.optimizer, self.X, self.y = optimizer, X, y
        self.dpi, self.per_decade = dpi, int(per_decade)
        self.chosen_gamma = float(optimizer.gamma)
        c = math.log10(self.chosen_gamma)
        lo, hi = math.floor(c + decades[0]), math.ceil(c + decades[1])
        self.range_slider = W.FloatRangeSlider(value=(lo, hi), min=lo - 3, max=hi + 3, step=1.0 / self.per_decade,
                                               description="log₁₀ γ", continuous_update=False, readout_format=".1f")
        lam = max(float(optimizer.lam), 1e-8)
        self.lambda_slider = W.FloatLogSlider(value=lam, base=10, min=math.log10(lam) - 4, max=math.log10(lam) + 4,
                                              step=0.1, description="λ", continuous_update=False,
                                              readout_format=".3g")
        self.momentum_toggle = W.Checkbox(value=True, description="K-FAC momentum curve")
        self.image = image_widget()
        self.table = W.HTML()
        self.status = W.HTML()
        self.fig = Figure(figsize=(8.6, 4.2), layout="constrained")  # wide: draw_figure7's legend is outside
        self.ax = self.fig.add_subplot(1, 1, 1)
        self._cache = SweepCache()
        self.data: pd.DataFrame | None = None
        self.lines: dict = {}
        self.timings: dict[str, float] = {}
        self.widget = W.VBox([W.HBox([self.range_slider, self.lambda_slider, self.momentum_toggle]),
                              self.image, self.table, self.status])
        for w in (self.range_slider, self.lambda_slider, self.momentum_toggle):
            w.observe(lambda change: self.update(), names="value")
        self.update()

    @property
    def gammas(self) -> list[float]:
        lo, hi = self.range_slider.value
        n = int(round((hi - lo) * self.per_decade)) + 1
        return [10 ** (lo + j / self.per_decade) for j in range(n)]

    @property
    def variants(self) -> list[str]:
        return [v.value for v in variants_shown(self.momentum_toggle.value)]

    def update(self) -> None:
        t0 = time.perf_counter()
        lam = float(self.lambda_slider.value)
        try:
            df = figure7_data(self.optimizer, self.X, self.y, self.gammas, lam=lam, cache=self._cache,
                              variants=self.variants)
        except (SingularFactorError, ValueError, RuntimeError) as e:
            self.status.value = error_html(f"λ = {lam:.3g}: {e}")
            return
        t1 = time.perf_counter()
        self.data = df
        self.lines = draw_figure7(self.ax, df, self.chosen_gamma, variants=self.variants)
        self.ax.set_title(f"Figure 7 live: iteration {self.optimizer.k - 1}, λ = {lam:.3g}", fontsize=10)
        best = df.loc[df.groupby("variant")["improvement"].idxmax()]
        self.table.value = ("<small>Best γ on the grid for each variant</small>"
                            + table_html(best[["variant", "gamma", "improvement", "alpha", "mu"]]))
        self.image.value = figure_png(self.fig, self.dpi)
        t2 = time.perf_counter()
        self.timings = {"compute_s": t1 - t0, "render_s": t2 - t1}
        self.status.value = f"<small>{len(self.gammas)} γ values; update {t2 - t0:.2f} s</small>"
