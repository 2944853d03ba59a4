"""What every explorer of :mod:`kfac_lens.widgets` shares: the PNG image of a persistent figure, HTML tables
and error lines, display in Jupyter, and the γ and layer controls."""

from __future__ import annotations

import html
import io

import ipywidgets as W
import pandas as pd
from matplotlib.figure import Figure

WIDGET_DPI = 72


def figure_png(fig: Figure, dpi: int = WIDGET_DPI) -> bytes:
    """PNG bytes of ``fig`` on a white background (one draw; no tight bbox, which would draw twice)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def image_widget() -> W.Image:
    """An Image widget shown at the PNG's own pixel size (a VBox would otherwise stretch and blur it)."""
    return W.Image(format="png", layout=W.Layout(align_self="flex-start", width="auto", height="auto"))


def table_html(df: pd.DataFrame) -> str:
    """A metrics table as HTML, numbers to 4 significant digits."""
    return df.to_html(float_format=lambda v: f"{v:.4g}", border=0, classes="kfac-lens-metrics")


def error_html(msg: str) -> str:
    """An error message as a red line (what an explorer shows instead of a figure it cannot draw)."""
    return f"<span style='color:#b00'>{html.escape(msg)}</span>"


class Explorer:
    """An explorer displays its ``widget`` in Jupyter."""

    widget: W.Widget

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class GammaLayerControls:
    """The γ slider and the layer selection, read as numbers."""

    gamma_slider: W.FloatLogSlider
    layer_select: W.SelectMultiple

    @property
    def gamma(self) -> float:
        return float(self.gamma_slider.value)

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.layer_select.value)
