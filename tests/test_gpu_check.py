"""``kfac-lens gpu-check`` on a machine without CUDA: a clear message, nothing run; and what it would run."""

from __future__ import annotations

from pathlib import Path

import torch

from kfac_lens import cli, gpu_check

TESTS = Path(__file__).resolve().parent


def test_without_cuda_it_says_so_and_checks_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu-check", "--out", str(tmp_path / "gc")]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "nothing was checked" in out
    assert not (tmp_path / "gc").exists()


def test_device_tests_are_the_ones_taking_the_device_fixture():
    files = {Path(p).name for p in gpu_check.device_test_files(TESTS)}
    assert {"test_devices.py", "test_core_fisher.py", "test_core_inverses.py"} <= files
    assert "test_gpu_check.py" not in files and "test_cli.py" not in files


def test_plan_covers_tests_benchmarks_and_figures_on_cuda(tmp_path):
    plan = {step.name: step for step in gpu_check.steps(tmp_path, "python", quick=True)}
    assert list(plan)[:5] == ["tests", "agreement", "bench-fisher", "bench-optimizer", "figures"]
    assert plan["tests"].argv[plan["tests"].argv.index("-k") + 1] == "cuda"
    for name in ("bench-fisher", "bench-optimizer", "figures"):
        assert plan[name].argv[plan[name].argv.index("--device") + 1] == "cuda"
    assert sum(step.timeout_s for step in plan.values()) <= 600


def test_help_lists_the_steps(capsys):
    try:
        cli.main(["gpu-check", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for name in ("tests", "agreement", "bench-fisher", "bench-optimizer", "figures", "distributed"):
        assert f"``{name}``" in out
