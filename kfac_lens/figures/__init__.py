"""The paper's figures, one ``draw_*`` function per figure and one figure function returning a
:class:`~kfac_lens.figures.panels.DrawnFigure` (figure, metrics DataFrame, panels).

Martens & Grosse (2015), Appendix C (Figures 5 and 6), Appendix E.4 (Figure 7) and companions of the
main text's Figures 2 and 3; docs/math.md §9 fixes the display convention, which every matrix panel
here follows:

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
  ``df.attrs["vmax"]``, the record's ``meta["vmax"]`` and the figure's title (a panel with a level of
  its own states it in its own title);
- a slim **colourbar** right of every matrix panel of the figure functions (0 to the white level,
  which it labels; the explorers go without), and the record's ``matrix_panels`` lists every matrix
  panel;
- **block boundaries** as thin coloured lines at the layer-block edges, with ticks at the edges and
  each block labelled by its layer in the paper's 1-based naming (0-based layer k is ``W{k+1}``, so
  the example network's middle layers ``[1, 2, 3, 4]`` are W2..W5);
- the paper's parameter layout (docs/math.md §1) for every matrix.

All figures use the object-oriented API (``matplotlib.figure.Figure``), never pyplot, so they work
under Agg, in notebooks and inside the explorers (:mod:`kfac_lens.widgets`) without touching global
state. The numbers come from the analysis layer: :class:`~kfac_lens.study.CurvatureStudy` and
:mod:`kfac_lens.sweep`.

Modules: :mod:`.panels` (panels, grids, the figure record), :mod:`.comparisons` (Figures 5, 6),
:mod:`.companions` (F vs F̃, F̃⁻¹'s structure, Appendix B), :mod:`.update_quality` (Figure 7), :mod:`.training`,
:mod:`.approximations` (every approximation against the exact F over training).
"""

from .approximations import approximation_history, draw_approximation_history, figure_approximations
from .companions import (
    CUMULANT_PANELS,
    cumulant_grid,
    draw_cumulants,
    draw_exact_vs_kfac,
    draw_inverse_structure,
    figure_cumulants,
    figure_exact_vs_kfac,
    figure_inverse_structure,
    inverse_structure_title,
    percent,
)
from .comparisons import draw_figure5, draw_figure6, figure5, figure6
from .update_quality import FIGURE7_STYLES, draw_figure7, figure7, figure7_linthresh
from .panels import (
    DEFAULT_DPI,
    VMAX_QUANTILE,
    DrawnFigure,
    MatrixPanel,
    PanelGrid,
    fmt_level,
    mean_pool,
    save_figure,
    shared_vmax,
)
from .training import (
    TRAINING_ERROR_DEFINITIONS,
    TRAINING_LOSS_DEFINITION,
    TrainingLabels,
    draw_training_curves,
    extra_progress_per_iteration,
    figure_training_curves,
    training_comparison_labels,
)

__all__ = [
    "CUMULANT_PANELS",
    "DEFAULT_DPI",
    "FIGURE7_STYLES",
    "TRAINING_ERROR_DEFINITIONS",
    "TRAINING_LOSS_DEFINITION",
    "VMAX_QUANTILE",
    "approximation_history",
    "TrainingLabels",
    "DrawnFigure",
    "MatrixPanel",
    "PanelGrid",
    "cumulant_grid",
    "draw_approximation_history",
    "draw_cumulants",
    "draw_exact_vs_kfac",
    "draw_figure5",
    "draw_figure6",
    "draw_figure7",
    "draw_inverse_structure",
    "draw_training_curves",
    "figure5",
    "figure6",
    "figure7",
    "figure7_linthresh",
    "figure_approximations",
    "figure_cumulants",
    "figure_exact_vs_kfac",
    "figure_inverse_structure",
    "extra_progress_per_iteration",
    "figure_training_curves",
    "fmt_level",
    "inverse_structure_title",
    "mean_pool",
    "percent",
    "save_figure",
    "shared_vmax",
    "training_comparison_labels",
]
