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


def test_figures_writes_one_metrics_table_per_figure(tmp_path, monkeypatch):
    import numpy as np

    it = np.arange(1, 31)

    def fake_comparison(preset, data, **kw):  # the real one trains for minutes
        h = pd.DataFrame({"iteration": it, "time": 0.1 * it, "loss": 1.0 / it, "batch_size": 100,
                          "error": np.where(it % 10 == 0, 2.0 / it, np.nan), "lr": 0.01})
        return {"SGD-Nesterov": h, "K-FAC block-tridiagonal": h.drop(columns="lr").assign(lr=np.nan)}

    monkeypatch.setattr(zoo, "training_comparison", fake_comparison)
    rc = cli.main(["figures", "--data", "digits", "--fig", "5", "inverse", "training", "--out", str(tmp_path),
                   "--quiet"])
    assert rc == 0
    tables = {}
    for name, figure_id in (("figure5", "5"), ("inverse", "inverse"), ("training", "training")):
        path = tmp_path / "metrics" / f"{name}.csv"
        assert path.stat().st_size > 100
        df = pd.read_csv(path)
        assert set(df["figure"].astype(str)) == {figure_id}
        assert not df.isna().all().any(), f"{name}.csv has an all-empty column"
        tables[figure_id] = df
    assert "lr" in tables["training"].columns and "matrix" not in tables["5"].columns
    assert "rel_error" not in tables["inverse"].columns  # only its own columns
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["figure5.csv", "inverse.csv", "training.csv"]
    # metrics.csv is their concatenation
    allm = pd.read_csv(tmp_path / "metrics.csv", low_memory=False)
    assert len(allm) == sum(len(t) for t in tables.values())
    for figure_id, t in tables.items():
        part = allm[allm["figure"].astype(str) == figure_id].dropna(axis=1, how="all").reset_index(drop=True)
        assert set(part.columns) == set(t.columns) and len(part) == len(t)
        num = t.select_dtypes("number").columns
        np.testing.assert_allclose(part[num].to_numpy(float), t[num].to_numpy(float), equal_nan=True)


@pytest.mark.parametrize("extra,seeds", [([], [4, 5, 6]), (["--training-seeds", "1"], [4])])
def test_training_figure_runs_the_comparison_over_seeds(tmp_path, monkeypatch, extra, seeds):
    """The training comparison is drawn over --training-seeds seeds from --seed (median and band)."""
    import numpy as np

    calls = []

    def fake_comparison(preset, data, **kw):
        calls.append(kw.get("seeds"))
        it = np.arange(1, 11)
        h = pd.concat([pd.DataFrame({"iteration": it, "time": 0.1 * it, "loss": 1.0 / it + s, "seed": s})
                       for s in kw["seeds"]], ignore_index=True)
        return {"SGD-Nesterov": h, "K-FAC block-diagonal": h}

    monkeypatch.setattr(zoo, "training_comparison", fake_comparison)
    assert cli.main(["figures", "--data", "digits", "--fig", "training", "--seed", "4", "--out", str(tmp_path),
                     "--quiet", *extra]) == 0
    assert calls == [seeds]


def test_training_iterations_are_passed_on_and_named_in_the_metrics(tmp_path, monkeypatch):
    """--training-iterations K runs the comparison for K K-FAC iterations and the metrics say so."""
    import numpy as np

    calls = []

    def fake_comparison(preset, data, **kw):
        calls.append(kw.get("iterations"))
        it = np.arange(1, 11)
        h = pd.DataFrame({"iteration": it, "time": 0.1 * it, "loss": 1.0 / it, "seed": 0})
        return {"SGD-Nesterov": h, "K-FAC block-diagonal": h}

    monkeypatch.setattr(zoo, "training_comparison", fake_comparison)
    assert cli.main(["figures", "--data", "digits", "--fig", "training", "--out", str(tmp_path), "--quiet",
                     "--training-seeds", "1", "--training-iterations", "10"]) == 0
    assert calls == [10]
    table = pd.read_csv(tmp_path / "metrics" / "training.csv")
    assert set(table["kfac_iterations_run"]) == {10} and set(table["preset_iterations"]) == {150}


def test_training_kfac_only_draws_the_two_inverses_and_their_progress(tmp_path, monkeypatch):
    """--training-kfac-only trains no baselines, writes figure_training_kfac.png and puts block-tridiagonal's
    extra progress per iteration in its metrics: here it reaches block-diagonal's last error (0.5, at
    iteration 100) at iteration 80, so +25%."""
    import numpy as np

    calls = []

    def fake_comparison(preset, data, **kw):
        calls.append(kw.get("baselines"))
        it = np.arange(1, 101)

        def run(first_low):
            return pd.DataFrame({"iteration": it, "time": 0.1 * it, "loss": 1.0 / it, "seed": 0,
                                 "error": np.where(it % 10 == 0, np.where(it < first_low, 2.0, 0.5), np.nan)})
        return {"K-FAC block-diagonal": run(100), "K-FAC block-tridiagonal": run(80)}

    monkeypatch.setattr(zoo, "training_comparison", fake_comparison)
    assert cli.main(["figures", "--data", "digits", "--fig", "training", "--out", str(tmp_path), "--quiet",
                     "--training-seeds", "1", "--training-kfac-only"]) == 0
    assert calls == [False]
    assert (tmp_path / "figure_training_kfac.png").exists() and not (tmp_path / "figure_training.png").exists()
    table = pd.read_csv(tmp_path / "metrics" / "training_kfac.csv")
    np.testing.assert_allclose(table["tridiag_extra_progress"], 0.25)


def test_training_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["figures", "--training-seeds", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
