"""The benchmark package: the explorer and memory benchmarks in tiny modes, the command line around them.

Timings and memory are printed by the benchmarks, never asserted against their targets here; these
tests check that the tables have their columns and hold positive, finite, self-consistent numbers.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys

import pytest

from kfac_lens import bench, cli
from kfac_lens.bench import memory

EXPLORER_COLUMNS = ["step", "seconds", "target_s", "ratio_to_target"]
MEMORY_COLUMNS = ["measure", "peak_GB", "target_GB", "ratio_to_target", "job_seconds"]


def _positive_finite(values) -> bool:
    return all(math.isfinite(float(v)) and float(v) > 0 for v in values)


@pytest.mark.timeout(60)
def test_explorer_quick_table():
    df = bench.run(["explorer", "--quick", "--no-print", "--repeats", "2", "--cases", "100", "--threads", "1"])
    assert list(df.columns) == EXPLORER_COLUMNS
    steps = list(df["step"])
    assert steps[:2] == ["γ move (wall clock)", "γ move, median of the moves"]
    assert {"compute", "render"} <= set(steps[2:])
    assert _positive_finite(df["seconds"]) and set(df["target_s"]) == {0.3}
    assert list(df["ratio_to_target"]) == pytest.approx(list(df["seconds"] / 0.3))
    # the parts are the explorer's split of the best move, so they fit inside its wall clock
    assert df["seconds"].iloc[2:].sum() <= df["seconds"].iloc[0] + 1e-3
    assert df["seconds"].iloc[0] == min(df.attrs["moves"]) and len(df.attrs["moves"]) == 2
    assert df["seconds"].iloc[1] == sorted(df.attrs["moves"])[1] >= df["seconds"].iloc[0]
    assert df.attrs["P"] == 1680


@pytest.mark.parametrize("sampler", ["psutil", "/proc"])
def test_memory_of_a_child_that_allocates(sampler, monkeypatch):
    if sampler == "/proc":
        monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` fails: the /proc fallback samples
    n = 150_000_000
    code = f"import time; b = b'x' * {n}; time.sleep(0.4)"
    df = bench.memory_benchmark([sys.executable, "-c", code], interval=0.02, verbose=False)
    assert list(df.columns) == MEMORY_COLUMNS
    assert _positive_finite(df["peak_GB"]) and _positive_finite(df["job_seconds"])
    assert (df["peak_GB"] >= n / memory.GB).all()  # both readings see the bytes the child wrote
    assert list(df["ratio_to_target"]) == pytest.approx(list(df["peak_GB"] / 1.5))
    assert df["job_seconds"].iloc[0] >= 0.4
    assert df.attrs["runs"][0].how.startswith(sampler)


def test_memory_command_option_and_failing_child(capsys):
    code = "import time; b = b'x' * 20_000_000; time.sleep(0.2)"
    assert bench.main(["memory", "--command", shlex.join([sys.executable, "-c", code])]) == 0
    out = capsys.readouterr().out
    assert "memory: peak resident memory of the command | target 1.5 GB" in out
    header = next(line for line in out.splitlines() if line.split()[:1] == ["measure"])
    assert header.split() == MEMORY_COLUMNS
    with pytest.raises(RuntimeError, match="exited with 3"):
        memory.child_peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


def test_memory_passes_the_figure_options_to_kfac_lens_figures(monkeypatch):
    """`bench memory --fig ... --data ...` runs a `kfac-lens figures` command line that the CLI accepts."""
    seen = []

    def fake_child(command, interval=0.05):
        seen.append(list(command))
        return memory.ChildMemory(10**8, 10**8, 1.0, 3, "fake", 0)

    monkeypatch.setattr(memory, "child_peak_rss", fake_child)
    df = bench.run(["memory", "--fig", "5", "cumulants", "--data", "digits", "--seed", "2", "--no-print"])
    assert list(df["peak_GB"]) == [0.1, 0.1]
    (command,) = seen
    assert command[:3] == [sys.executable, "-m", "kfac_lens.cli"]
    parsed = []
    monkeypatch.setattr(cli, "run_figures", lambda args: parsed.append(args) or 0)
    assert cli.main(command[3:]) == 0
    (args,) = parsed
    assert args.fig == ["5", "cumulants"] and args.data == "digits" and args.quiet and args.device == "cpu"
    assert args.seed == 2


@pytest.mark.parametrize("name", ["explorer", "memory"])
def test_new_benchmarks_have_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kfac-lens bench {name}")
    assert "--quick" in out and "--repeats" in out


def test_python_m_kfac_lens_bench_lists_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "kfac_lens.bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for name in bench.BENCHMARKS:
        assert name in out.stdout


def test_distributed_benchmark_runs_two_ranks():
    from kfac_lens.bench import run
    df = run(["distributed", "--quick", "--ranks", "2", "--jobs", "kfac", "--iterations", "1", "--no-print"])
    assert list(df["ranks"]) == [2, 2]
    assert set(df["job"]) == {"K-FAC blockdiag iteration (m = 100)", "K-FAC tridiag iteration (m = 100)"}
    assert (df["seconds"] > 0).all() and df["seconds"].map(math.isfinite).all()
