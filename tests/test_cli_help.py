"""Every `kfac-lens` subcommand answers --help with help text and defaults; --version and --seed exist."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kfac_lens import __version__, cli


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv,prog", [
    ([], "kfac-lens"),
    (["figures"], "kfac-lens figures"),
    (["train"], "kfac-lens train"),
    (["bench"], "kfac-lens bench"),
    (["bench", "fisher"], "kfac-lens bench fisher"),
    (["bench", "optimizer"], "kfac-lens bench optimizer"),
    (["bench", "distributed"], "kfac-lens bench distributed"),
    (["inspect"], "kfac-lens inspect"),
    (["gpu-check"], "kfac-lens gpu-check"),
])
def test_every_subcommand_has_help(argv, prog, capsys):
    out = help_of(argv, capsys)
    assert out.startswith(f"usage: {prog}")
    assert "python -m" not in out


@pytest.mark.parametrize("argv", [["figures"], ["train"]])
def test_every_option_has_help_text_and_its_default(argv, capsys):
    out = help_of(argv, capsys)
    options = " ".join(out[out.index("options:"):].split())
    for option, default in (("--preset", "quick"), ("--data", "mnist"), ("--seed", "0")):
        text = options[options.index(option + " "):]
        text = text[:text.index(" --", 3)]  # this option's entry, up to the next option
        assert f"(default: {default})" in text, option
    if argv == ["figures"]:
        assert "(default: figures)" in " ".join(out.split())  # --out
    assert "cuda when torch sees a GPU" in " ".join(out.split())


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kfac-lens {__version__}"


def test_seed_reaches_the_zoo(monkeypatch, tmp_path):
    seen = {}

    def fake(preset, data, **kw):
        seen.update(kw)
        raise SystemExit(0)

    from kfac_lens import zoo
    monkeypatch.setattr(zoo, "example_network", fake)
    with pytest.raises(SystemExit):
        cli.main(["figures", "--fig", "5", "--seed", "3", "--out", str(tmp_path), "--quiet"])
    assert seen["seed"] == 3
    with pytest.raises(SystemExit):
        cli.main(["train", "example", "--seed", "4"])
    assert seen["seed"] == 4


def test_installed_cli_runs_the_tests_of_a_checkout():
    """The installed `kfac-lens test` is the same command as ./kfac-lens test (here: collect only)."""
    out = subprocess.run([sys.executable, "-m", "kfac_lens.cli", "test", "--collect-only", "-q",
                          "tests/test_cli_help.py"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "test_installed_cli_runs_the_tests_of_a_checkout" in out.stdout
