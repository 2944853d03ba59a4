"""The `kfac-lens` command line: the figures job on the offline digits data, and its data-unavailable path."""

from __future__ import annotations

import pandas as pd
import pytest

from kfac_lens import cli, zoo
from kfac_lens.data import DataUnavailableError


def test_figures_on_digits_writes_pngs_and_metrics(tmp_path, capsys):
    rc = cli.main(["figures", "--data", "digits", "--fig", "5", "6", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    for name in ("figure5.png", "figure6.png", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 1000
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert set(metrics["figure"].astype(str)) == {"5", "6"}
    out = capsys.readouterr().out
    assert "figure5.png" in out and "metrics.csv" in out


def test_figures_without_mnist_names_the_digits_way_out(tmp_path, monkeypatch, capsys):
    def unavailable(*a, **kw):
        raise DataUnavailableError("MNIST could not be obtained (test)")

    monkeypatch.setattr(zoo, "example_network", unavailable)
    rc = cli.main(["figures", "--fig", "5", "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "--data digits" in capsys.readouterr().err


def test_cuda_request_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["figures", "--device", "cuda", "--fig", "5"])
