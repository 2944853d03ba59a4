"""The README's Python examples run as written (docs that run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, agg_backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    checked = 0
    if "terms" in namespace:  # Appendix B holds to rounding for the exact Fisher
        t = namespace["terms"]
        assert float(t.residual.norm() / t.difference.norm()) < 1e-10
        checked += 1
    if "history" in namespace:  # the K-FAC example trains
        h = namespace["history"]
        assert h["loss"].iloc[-1] < h["loss"].iloc[0]
        checked += 1
    if "prop" in namespace:
        assert namespace["prop"].M < 0  # the proposal decreases the quadratic model
        checked += 1
    if "dropin_losses" in namespace:  # the drop-in loop trains
        losses = namespace["dropin_losses"]
        assert losses[-1] < 0.5 * losses[0]
        checked += 1
    if "exported" in namespace:  # the export example: files in the paper layout that load back
        import numpy as np
        import torch
        saved = torch.load(tmp_path / "curvature.pt")
        for name, M in namespace["exported"].items():
            assert torch.equal(saved[name], M)
            assert np.array_equal(np.load(tmp_path / f"{name}.npy"), M.numpy())
        assert sum(r * c for r, c in saved["layer_shapes"]) == saved["F"].shape[0]
        checked += 1
    assert checked, "each README example should produce something this test checks"
