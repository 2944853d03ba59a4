"""`kfac-lens inspect` on a user's own network: a small CNN and an MLP with a skip connection, written as
factory files, trained briefly on the digits, saved, and inspected; the numbers in metrics.csv against the
independent oracle (tests/oracle.py), and one clear message per bad argument."""

from __future__ import annotations

import textwrap

import numpy as np
import oracle as O
import pandas as pd
import pytest
import torch
from torch import nn

from kfac_lens import cli
from kfac_lens.data import load_digits
from kfac_lens.inspect_network import InspectError, load_factory, load_inputs, load_weights

N_CASES = 40

CNN_FILE = """
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(width, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def make():
    torch.manual_seed(0)
    return SmallCNN()


def make_wide():
    return SmallCNN(width=5)
"""

SKIP_FILE = """
import torch
from torch import nn


class SkipMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 12)
        self.fc2 = nn.Linear(12, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + torch.tanh(self.fc2(h))
        return self.out(h)


def make():
    torch.manual_seed(1)
    return SkipMLP()
"""


def _train(model, X, y, steps=15):
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """The two factory files and their checkpoints (the CNN's under a "model" key, the MLP's plain)."""
    root = tmp_path_factory.mktemp("user")
    (root / "cnn.py").write_text(textwrap.dedent(CNN_FILE))
    (root / "skip.py").write_text(textwrap.dedent(SKIP_FILE))
    ds = load_digits()
    X, y = ds.X[:200], ds.y[:200]
    cnn = _train(load_factory(f"{root / 'cnn.py'}:make"), X.reshape(-1, 1, 8, 8), y)
    torch.save({"model": cnn.state_dict(), "step": 15}, root / "cnn.pt")
    skip = _train(load_factory(f"{root / 'skip.py'}:make"), X, y)
    torch.save(skip.state_dict(), root / "skip.pt")
    return root


def _inspect(root, name, out, *extra):
    return cli.main(["inspect", f"{root / name}.py:make", "--weights", str(root / f"{name}.pt"), "--data", "digits",
                     "--cases", str(N_CASES), "--out", str(out), "--device", "cpu", "--quiet", *extra])


def test_inspect_cnn_writes_every_figure_and_the_table(user_files, tmp_path, capsys):
    assert _inspect(user_files, "cnn", tmp_path) == 0
    for name in ("figure5.png", "figure6.png", "figure_exact_vs_kfac.png", "figure_cumulants.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert set(metrics["figure"].astype(str)) == {"5", "6", "exact", "cumulants", "summary"}
    out = capsys.readouterr().out
    assert "as (N, 1, 8, 8) images" in out  # flat rows refused by the CNN, so read as images
    assert "approx=reduce" in out  # the convolutions have 16 and 4 uses per case
    for row in ("F̃ vs F", "F̆⁻¹ vs F̃⁻¹", "F̂⁻¹ vs F̃⁻¹"):
        assert row in out
    cumulants = metrics[metrics["figure"] == "cumulants"]
    assert set(cumulants["block"]) == {"(2,3)"}  # the first pair of layers used once per case


def test_inspect_skip_mlp_matches_the_oracle(user_files, tmp_path, capsys):
    """The overall and per-block errors of F̃ against F in metrics.csv, recomputed by the oracle's per-case
    autograd Jacobians and its definitions of the factors (layers used once per case: expand = reduce)."""
    assert _inspect(user_files, "skip", tmp_path, "--gamma", "0.01") == 0
    out = capsys.readouterr().out
    assert "inputs as stored" in out and "cumulants skipped" not in out
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    summary = metrics[metrics["figure"] == "summary"]

    model = load_factory(f"{user_files / 'skip.py'}:make")
    model.load_state_dict(torch.load(user_files / "skip.pt"))
    model = model.double()
    X = load_digits().X[:N_CASES].double()
    mods = [model.fc1, model.fc2, model.out]
    F = O.module_exact_fisher(model, mods, X, "categorical")
    A, G = {}, {}
    per_case = [O.module_uses(model, mods, X[n:n + 1], "categorical")[1] for n in range(N_CASES)]
    for k in range(3):
        for l in range(3):
            A[k, l] = sum(torch.outer(c[k][0][0], c[l][0][0]) for c in per_case) / N_CASES
            G[k, l] = sum(c[k][1][0].T @ c[l][1][0] for c in per_case) / N_CASES
    F_tilde = O.kfac_dense(A, G, range(3))
    szs = [r * c for r, c in O.module_shapes(mods)]

    def stored(block_row, block_col):
        row = summary[(summary.comparison == "F̃ vs F") & (summary.block_row == block_row)
                      & (summary.block_col == block_col)]
        return float(row["rel_error"].iloc[0])

    assert stored("all", "all") == pytest.approx(O.rel(F_tilde, F), rel=1e-6)
    assert stored("W2", "W3") == pytest.approx(O.rel(O.block(F_tilde, szs, 1, 2), O.block(F, szs, 1, 2)), rel=1e-6)
    assert set(summary["gamma"].round(12)) == {0.0, 0.01}


def test_a_gpu_style_checkpoint_loads_on_the_cpu(user_files, tmp_path):
    """A checkpoint saved from DataParallel ("module." prefixes) under "state_dict" loads onto the CPU."""
    model = load_factory(f"{user_files / 'skip.py'}:make")
    sd = torch.load(user_files / "skip.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pt")
    fresh = load_weights(load_factory(f"{user_files / 'skip.py'}:make"), tmp_path / "dp.pt", "cpu")
    model.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


# ----------------------------------------------------------------------------------------- the messages
def _error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kfac-lens inspect: ")
    return err


def test_missing_file_names_the_argument(user_files, tmp_path, capsys):
    err = _error(["inspect", str(tmp_path / "nowhere.py") + ":make", "--weights", str(user_files / "skip.pt"),
                  "--data", "digits"], capsys)
    assert "does not exist" in err and "FILE.py:FACTORY" in err
    err = _error(["inspect", str(user_files / "skip.py"), "--weights", "x.pt", "--data", "digits"], capsys)
    assert "must be FILE.py:FACTORY" in err


def test_missing_factory_lists_the_callables(user_files, capsys):
    err = _error(["inspect", f"{user_files / 'skip.py'}:build", "--weights", str(user_files / "skip.pt"),
                  "--data", "digits"], capsys)
    assert "no callable 'build'" in err and "make" in err and "SkipMLP" in err


def test_weights_that_do_not_fit_name_the_keys_and_shapes(user_files, tmp_path, capsys):
    err = _error(["inspect", f"{user_files / 'cnn.py'}:make_wide", "--weights", str(user_files / "cnn.pt"),
                  "--data", "digits", "--out", str(tmp_path)], capsys)
    assert "--weights" in err and "does not fit the model" in err
    assert "c1.weight (3, 1, 3, 3) in the checkpoint, (5, 1, 3, 3) in the model" in err
    err = _error(["inspect", f"{user_files / 'skip.py'}:make", "--weights", str(user_files / "cnn.pt"),
                  "--data", "digits", "--out", str(tmp_path)], capsys)
    assert "missing keys ['out.weight', 'out.bias']" in err and "unexpected keys ['c1.weight'" in err
    with pytest.raises(InspectError, match="--weights.*does not exist"):
        load_weights(load_factory(f"{user_files / 'skip.py'}:make"), tmp_path / "none.pt")


def test_data_of_the_wrong_width_names_the_argument(user_files, tmp_path, capsys):
    np.savez(tmp_path / "narrow.npz", X=np.zeros((10, 30), np.float32), y=np.zeros(10, np.int64))
    err = _error(["inspect", f"{user_files / 'skip.py'}:make", "--weights", str(user_files / "skip.pt"),
                  "--data", str(tmp_path / "narrow.npz"), "--out", str(tmp_path)], capsys)
    assert "--data" in err and "(10, 30)" in err and "none of the shapes" in err
    np.savez(tmp_path / "nox.npz", inputs=np.zeros((4, 64), np.float32))
    with pytest.raises(InspectError, match="no 'X'"):
        load_inputs(str(tmp_path / "nox.npz"), load_factory(f"{user_files / 'skip.py'}:make"))
    with pytest.raises(InspectError, match="neither mnist, digits"):
        load_inputs("cifar", load_factory(f"{user_files / 'skip.py'}:make"))


def test_inspect_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["inspect", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: kfac-lens inspect") and "(default: 500)" in out
