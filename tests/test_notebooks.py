"""The story notebooks in notebooks/ run top to bottom and show what they promise.

Each notebook is executed once per session by :mod:`notebook_run` (headless nbclient, one after the
other, from a scratch copy so the committed files are never rewritten); tests/test_notebook_claims.py
reads the same executed copies. The claims the notebooks state in prose are checked there against
the key numbers each notebook displays; a few are also asserted in the notebooks' own cells (for
example that F = F̃ for one case), so a wrong number fails the cell and therefore the test.
"""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from notebook_run import KEY_NUMBERS_TAG, NOTEBOOK_DIR, RUN_TIMEOUT, executed

pytestmark = pytest.mark.notebook

PNG = b"\x89PNG\r\n\x1a\n"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# What each notebook must show: at least this many PNG figures, and these explorers (their widget
# views) — checked on the executed copy.
EXPECTED = {
    "01_exact_fisher_vs_kfac.ipynb": dict(figures=3, explorers=["FisherExplorer"]),
    "02_block_diagonal_vs_tridiagonal.ipynb": dict(figures=3, explorers=["DampingExplorer"]),
    "03_damping_and_rescaling.ipynb": dict(figures=1, explorers=["RescalingExplorer"]),
    "04_training.ipynb": dict(figures=1, explorers=[]),
    "05_your_own_network.ipynb": dict(figures=2, explorers=["DampingExplorer"]),  # on digits (notebook_run)
    "06_approximations.ipynb": dict(figures=1, explorers=["ApproximationExplorer"]),
}


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def _image_widget_values(nb) -> list[int]:
    """Byte sizes of the ``value`` of every Image widget in the saved widget state (nbclient stores
    the state of the widgets alive at the end of the run; binary values travel as base64 buffers)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    sizes = []
    for model in state.values():
        if model.get("model_name") != "ImageModel":
            continue
        value = model.get("state", {}).get("value")
        buffers = [b for b in model.get("buffers", []) if b.get("path") == ["value"]]
        if buffers:
            sizes.append(len(base64.b64decode(buffers[0]["data"])))
        elif isinstance(value, str):
            sizes.append(len(value))
        else:
            sizes.append(0)
    return sizes


def test_every_notebook_is_covered():
    found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == sorted(EXPECTED), f"notebooks/ holds {found}; update EXPECTED in {Path(__file__).name}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_is_clean(name):
    """No outputs or execution counts are committed, the kernel is the plain python3 one, and the
    key-numbers cell that tests/test_notebook_claims.py reads is there."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata, "strip the saved widget state"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    for i, cell in enumerate(code):
        assert not cell.get("outputs"), f"code cell {i} of {name} has committed outputs"
        assert cell.get("execution_count") is None, f"code cell {i} of {name} has an execution count"
    text = "\n".join(c.source for c in nb.cells)
    assert "MPLBACKEND" not in text
    assert "Appendix" in text, "each story cites the paper's appendices"
    tagged = [c for c in code if KEY_NUMBERS_TAG in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one code cell tagged {KEY_NUMBERS_TAG!r}"


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, tmp_path_factory):
    nb = executed(name, tmp_path_factory)  # raises CellExecutionError on the first failing cell

    outputs = list(_outputs(nb))
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{name}: error outputs {[e.get('ename') for e in errors]}"
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Traceback" not in stderr, f"{name}: a traceback went to stderr:\n{stderr[-2000:]}"

    want = EXPECTED[name]
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= want["figures"], f"{name}: {len(pngs)} figures shown, expected {want['figures']}"
    for png in pngs:
        assert png.startswith(PNG) and len(png) > 10_000, f"{name}: a figure output is not a real PNG"
    text_only = [o for o in outputs
                 if "<Figure size" in o.get("data", {}).get("text/plain", "") and "image/png" not in o["data"]]
    assert not text_only, f"{name}: a Figure was shown as text only (no inline backend?)"

    views = [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    assert len(views) == len(want["explorers"]), (
        f"{name}: {len(views)} widget views, expected one per explorer {want['explorers']}"
    )
    if want["explorers"]:
        # every explorer rendered its figure into its Image widget before the run ended
        sizes = _image_widget_values(nb)
        assert sizes, f"{name}: no Image widget in the saved widget state"
        assert min(sizes) > 1000, f"{name}: an explorer's Image widget is empty ({sizes})"
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert tables, f"{name}: no table (DataFrame) was shown"
